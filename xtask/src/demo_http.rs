//! The demo's HTTP server: answers every request with one fixed body. Small on
//! purpose, so the demo needs nothing but this repository.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
};

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct Options {
    /// Address to listen on.
    #[arg(long)]
    bind: SocketAddr,
    /// Body of every answer.
    #[arg(long)]
    body: String,
}

pub fn serve(options: &Options) -> anyhow::Result<()> {
    let listener = TcpListener::bind(options.bind)
        .with_context(|| format!("cannot listen on {}", options.bind))?;
    let body = format!("{}\n", options.body);
    for stream in listener.incoming().flatten() {
        let body = body.clone();
        std::thread::spawn(move || answer(stream, &body));
    }
    Ok(())
}

fn answer(stream: TcpStream, body: &str) {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    // Read the request head; its content does not matter.
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        line.clear();
    }
    let _ = (&stream).write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}
