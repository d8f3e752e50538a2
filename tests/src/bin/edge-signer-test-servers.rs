//! Test helper, not part of the product: the EST server or the JWK rotation API of the tests,
//! as a process for `scripts/demo`. Prints `port N` and `ca FILE`, then serves until killed.
//! usage: edge-signer-test-servers est DIR USER PASSWORD | jwk DIR
//!
//! Also the attacker of the API flood test: `flood SOCKET N` opens N connections to the API
//! socket, each starting a 1 MB `POST /v1/config/apply` and sending up to half of its body
//! for 10 s, prints `opened N`, then holds them until killed.

use edge_signer_tests::est::{EstMode, EstServer};
use edge_signer_tests::jwk::JwkApi;
use std::path::Path;

/// The flood: N connections, each a half-sent 1 MB body, held open.
fn flood(socket: &str, n: usize) -> ! {
    use std::io::Write;
    let head = "POST /v1/config/apply HTTP/1.1\r\nHost: edge\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n";
    let mut conns = Vec::new();
    for _ in 0..n {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) {
            let _ = s.write_all(head.as_bytes());
            let _ = s.set_nonblocking(true);
            conns.push((s, 512 * 1024usize));
        }
    }
    println!("opened {}", conns.len());
    let chunk = vec![b'x'; 64 * 1024];
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let mut left = false;
        for (s, rest) in conns.iter_mut().filter(|c| c.1 > 0) {
            match s.write(&chunk[..chunk.len().min(*rest)]) {
                Ok(k) => *rest -= k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => *rest = 0,
            }
            left |= *rest > 0;
        }
        if !left {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    println!("sent");
    loop {
        std::thread::park();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("flood") && args.len() == 4 {
        flood(&args[2], args[3].parse().unwrap_or(0));
    }
    let (port, ca, _keep): (u16, String, Box<dyn std::any::Any>) =
        match args.get(1).map(String::as_str) {
            Some("est") if args.len() == 5 => {
                let s = EstServer::start(Path::new(&args[2]), &args[3], &args[4], EstMode::Issue);
                (s.port, s.ca_file.display().to_string(), Box::new(s))
            }
            Some("jwk") if args.len() == 3 => {
                let s = JwkApi::start(Path::new(&args[2]));
                (s.port, s.ca_file.display().to_string(), Box::new(s))
            }
            _ => {
                eprintln!("usage: edge-signer-test-servers est DIR USER PASSWORD | jwk DIR");
                std::process::exit(2);
            }
        };
    println!("port {port}\nca {ca}");
    loop {
        std::thread::park();
    }
}
