"""A client that holds one keep-alive connection and polls, as connection
pools do: Python's http.client, a request every INTERVAL_MS, reconnecting
when the connection fails.

Usage: polling_client.py HOST PORT INTERVAL_MS SECONDS [DEV]

Prints one JSON object per request: wall-clock time, which connection (1 for
the first, +1 per reconnect), the answer's status and body, or the error.
"""
import http.client
import json
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
interval, seconds = int(sys.argv[3]) / 1000, float(sys.argv[4])
headers = {"X-Dev": sys.argv[5]} if len(sys.argv) > 5 else {}
end = time.monotonic() + seconds
connection, number = None, 0
index = 0
while time.monotonic() < end:
    if connection is None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        number += 1
    line = {"t": time.time(), "connection": number}
    try:
        connection.request("GET", f"/poll/{index}", headers=headers)
        response = connection.getresponse()
        line.update(status=response.status, body=response.read().decode())
    except (OSError, http.client.HTTPException) as error:
        line.update(error=f"{type(error).__name__}: {error}")
        connection.close()
        connection = None
    print(json.dumps(line), flush=True)
    index += 1
    time.sleep(interval)
if connection is not None:
    connection.close()
