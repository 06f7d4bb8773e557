"""One keep-alive connection of Python's http.client, as an application uses it.

Usage: keepalive_client.py HOST PORT DEV...

Sends `GET /python/N` for each DEV (an `X-Dev` header value, or `-` for none)
on a single HTTPConnection and prints one JSON object per answer: status, body,
the client's own address on the connection, and whether the socket is still
the one the first request went out on.
"""
import http.client
import json
import sys

host, port = sys.argv[1], int(sys.argv[2])
connection = http.client.HTTPConnection(host, port, timeout=20)
connection.connect()
first = connection.sock
for index, dev in enumerate(sys.argv[3:]):
    headers = {} if dev == "-" else {"X-Dev": dev}
    connection.request("GET", f"/python/{index}", headers=headers)
    response = connection.getresponse()
    body = response.read().decode()
    sock = connection.sock
    print(json.dumps({
        "status": response.status,
        "body": body,
        "local": list(sock.getsockname()[:2]) if sock else None,
        "same_socket": sock is first,
    }), flush=True)
connection.close()
