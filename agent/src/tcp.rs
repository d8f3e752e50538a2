//! TCP to a name's addresses: the first that accepts, in the resolver's order (a refused
//! address, e.g. `::1` for `localhost`, gives way to the next). Shared by the agent's own
//! HTTP client and the proxy's targets.

use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Connect to the first of `name`'s `addrs` that accepts; else each address's error,
/// `addr: error` joined by `; ` (or that `name` resolves to no address).
pub async fn connect_any(name: &str, addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut errors = Vec::new();
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    Err(if errors.is_empty() {
        format!("{name} resolves to no address")
    } else {
        errors.join("; ")
    })
}
