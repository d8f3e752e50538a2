//! Test helper, not part of the product: the EST server or the JWK rotation API of the tests,
//! as a process for `scripts/demo`. Prints `port N` and `ca FILE`, then serves until killed.
//! usage: edge-signer-test-servers est DIR USER PASSWORD | jwk DIR

use edge_signer_tests::est::{EstMode, EstServer};
use edge_signer_tests::jwk::JwkApi;
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
