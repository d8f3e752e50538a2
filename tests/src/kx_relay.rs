//! A TCP relay that reads the key exchange off the wire: for each connection, the groups the
//! client's ClientHello offers key shares for, and the group of the server's first
//! ServerHello (and whether it was a HelloRetryRequest). What the agent logs is not
//! evidence of what it negotiated; the bytes between it and a server are.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// `X25519MLKEM768`.
pub const X25519MLKEM768: u16 = 0x11ec;
/// `X25519`.
pub const X25519: u16 = 0x001d;
/// `secp256r1`.
pub const SECP256R1: u16 = 0x0017;

/// SHA-256("HelloRetryRequest"): the `random` of a ServerHello that is a HelloRetryRequest.
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// What one connection's first flight showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Groups of the key shares in the ClientHello, in order.
    pub offered: Vec<u16>,
    /// Group of the server's first ServerHello key share.
    pub chosen: Option<u16>,
    /// That ServerHello was a HelloRetryRequest (an extra round trip).
    pub retry: bool,
}

/// A relay on a loopback port to `127.0.0.1:target`.
pub struct KxRelay {
    /// Its port.
    pub port: u16,
    seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
}

impl KxRelay {
    /// Start relaying to `target`.
    pub fn start(target: u16) -> KxRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let all = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let one = Arc::new(Mutex::new(Seen::default()));
                all.lock().unwrap().push(one.clone());
                pump(&client, &server, one.clone(), true);
                pump(&server, &client, one, false);
            }
        });
        KxRelay { port, seen }
    }

    /// What every connection so far showed.
    pub fn seen(&self) -> Vec<Seen> {
        let all = self.seen.lock().unwrap();
        all.iter().map(|s| s.lock().unwrap().clone()).collect()
    }
}

/// Copy `from` to `to` on a thread, reading the first handshake message on the way.
fn pump(from: &TcpStream, to: &TcpStream, seen: Arc<Mutex<Seen>>, from_client: bool) {
    let (mut from, mut to) = (
        from.try_clone().expect("clone"),
        to.try_clone().expect("clone"),
    );
    std::thread::spawn(move || {
        let mut head = Vec::new();
        let mut parsed = false;
        let mut buf = [0u8; 16384];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !parsed {
                head.extend_from_slice(&buf[..n]);
                if let Some(msg) = first_handshake(&head) {
                    let mut s = seen.lock().unwrap();
                    if from_client {
                        s.offered = client_shares(msg).unwrap_or_default();
                    } else if let Some((group, retry)) = server_share(msg) {
                        s.chosen = Some(group);
                        s.retry = retry;
                    }
                    parsed = true;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// The body of the first handshake message, once its record is complete (a ClientHello with
/// an ML-KEM share fits one record).
fn first_handshake(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 9 || b[0] != 0x16 {
        return None;
    }
    let rec_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    let rec = b.get(5..5 + rec_len)?;
    let len = usize::from(rec[1]) << 16 | usize::from(rec[2]) << 8 | usize::from(rec[3]);
    rec.get(4..4 + len)
}

/// Read `n` bytes at `*at`.
fn take<'a>(m: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
    let s = m.get(*at..*at + n)?;
    *at += n;
    Some(s)
}

fn u16_at(m: &[u8], at: &mut usize) -> Option<u16> {
    take(m, at, 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

/// The extensions of a hello, from `at` (after the cipher suite(s) and compression).
fn extensions(m: &[u8], mut at: usize) -> Option<Vec<(u16, &[u8])>> {
    let len = usize::from(u16_at(m, &mut at)?);
    let end = at + len;
    let mut out = Vec::new();
    while at < end {
        let t = u16_at(m, &mut at)?;
        let l = usize::from(u16_at(m, &mut at)?);
        out.push((t, take(m, &mut at, l)?));
    }
    Some(out)
}

/// ClientHello: the groups of its key shares.
fn client_shares(m: &[u8]) -> Option<Vec<u16>> {
    let mut at = 2 + 32;
    let sid = usize::from(*m.get(at)?);
    at += 1 + sid;
    let suites = usize::from(u16_at(m, &mut at)?);
    at += suites;
    let comp = usize::from(*m.get(at)?);
    at += 1 + comp;
    let (_, ks) = extensions(m, at)?.into_iter().find(|(t, _)| *t == 0x33)?;
    let mut at = 2;
    let mut groups = Vec::new();
    while at < ks.len() {
        groups.push(u16_at(ks, &mut at)?);
        let l = usize::from(u16_at(ks, &mut at)?);
        at += l;
    }
    Some(groups)
}

/// ServerHello: the group of its key share, and whether it is a HelloRetryRequest.
fn server_share(m: &[u8]) -> Option<(u16, bool)> {
    let retry = m.get(2..34)? == HRR_RANDOM;
    let mut at = 2 + 32;
    let sid = usize::from(*m.get(at)?);
    at += 1 + sid + 2 + 1;
    let (_, ks) = extensions(m, at)?.into_iter().find(|(t, _)| *t == 0x33)?;
    Some((u16::from_be_bytes([*ks.first()?, *ks.get(1)?]), retry))
}
