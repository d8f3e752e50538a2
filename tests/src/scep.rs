//! Debian's `scepserver` (micromdm's SCEP server) with its own CA, on a loopback port, for
//! one test: stopped and started again on the same port and depot when a test asks.

use crate::{free_port, wait_port, Env, Guard};
use edge_signer::issuer::scep::message;
use std::process::{Command, Stdio};

/// A running (or stopped) scepserver.
pub struct ScepServer {
    child: Option<Guard>,
    dir: std::path::PathBuf,
    /// Its port.
    pub port: u16,
    challenge: String,
}

impl ScepServer {
    /// A new CA in `env`'s `scep/` and the server on a free port, enforcing `challenge`,
    /// renewing at any time (`-allowrenew 0`). The CA certificate is `scep-ca.pem`.
    pub fn start(env: &Env, challenge: &str) -> ScepServer {
        let dir = env.path("scep");
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("scepserver")
            .args(["ca", "-init"])
            .current_dir(&dir)
            .output()
            .expect("scepserver (scripts/setup installs scep)");
        assert!(out.status.success(), "{out:?}");
        std::fs::copy(dir.join("depot/ca.pem"), env.path("scep-ca.pem")).unwrap();
        let mut s = ScepServer {
            child: None,
            dir,
            port: free_port(),
            challenge: challenge.to_owned(),
        };
        s.resume();
        s
    }

    /// Stop the server (kill -9).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Start it again on the same port with the same depot.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("scepserver.log"))
            .unwrap();
        let child = Command::new("scepserver")
            .args(["-depot", "depot", "-port", &self.port.to_string()])
            .args(["-challenge", &self.challenge, "-allowrenew", "0", "-debug"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("scepserver");
        self.child = Some(Guard(child));
        wait_port(self.port);
    }

    /// The SCEP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/scep", self.port)
    }
}

/// A configuration with one RSA identity `gw` (CN `NAME`, DNS name `NAME.example`) enrolled
/// by `server`, the challenge read from `scep-challenge` (holding `challenge`), and `extra`
/// lines in the issuer table.
pub fn scep_config(env: &Env, server: &ScepServer, name: &str, challenge: &str, extra: &str) {
    std::fs::write(env.path("scep-challenge"), format!("{challenge}\n")).unwrap();
    let cfg = format!(
        "{token}\n[[identity]]\nname = \"gw\"\nkey_type = \"rsa-2048\"\n\
         subject = {{ cn = \"{name}\" }}\nsans = [\"dns:{name}.example\"]\nissuer = \"scep\"\n\
         usage = [\"client\"]\nsubject_match = \"none\"\noverlap = \"1h\"\n\
         [identity.renewal]\nretry_min = \"1s\"\nretry_max = \"2s\"\n\
         \n[[issuer]]\nname = \"scep\"\nkind = \"scep\"\nurl = \"{url}\"\n\
         ca_bundle = \"{ca}\"\nchallenge = {{ file = \"{secret}\" }}\n{extra}\n\
         [paths]\nstate_dir = \"{p}/state\"\n",
        token = env.token_toml(),
        url = server.url(),
        ca = env.path_str("scep-ca.pem"),
        secret = env.path_str("scep-challenge"),
        p = env.dir.path().display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}

/// A fresh env, scepserver enforcing `s3cret`, and identity `gw` (CN `NAME`) configured to
/// send `challenge`, with `extra` in its issuer table.
pub fn scep_env(name: &str, challenge: &str, extra: &str) -> (Env, ScepServer) {
    let env = Env::new();
    let server = ScepServer::start(&env, "s3cret");
    scep_config(&env, &server, name, challenge, extra);
    (env, server)
}

/// A double in front of a real scepserver for what it never does: answer PENDING, and offer
/// no POST (its GetCACaps is the real one without `POSTPKIOperation`, so PKIOperation comes
/// by GET and a POST is refused). It follows RFC 8894 strictly and nothing more: a PKCSReq is passed to the real server, whose
/// issued certificate (its envelope, encrypted to the request's signer) is held back while
/// the double answers PENDING; every CertPoll for that transaction before the `polls`-th is
/// answered PENDING again, then SUCCESS with the held envelope. Each CertRep is signed by
/// the real CA's key (`openssl dgst -sign` with the server's `depot/ca.key`) and echoes the
/// request's transactionID and senderNonce; a CertPoll for an unknown transaction is
/// FAILURE badCertId. GetCACaps and GetCACert are the real server's. [`Self::refusing_renewal`]
/// stands for a CA that did not issue the current certificate: RenewalReq is FAILURE
/// badRequest, a PKCSReq is answered SUCCESS at once. [`Self::losing_first_answer`] passes
/// every PKIOperation to the real server and its answer back, except the first answer, which
/// is lost (the connection closes after the server acted).
pub struct PendingDouble {
    /// Its port.
    pub port: u16,
    /// The messageType of every PKIOperation received, in order.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pending,
    RefusingRenewal,
    LosingFirstAnswer { lost: bool },
}

struct DoubleState {
    upstream: String,
    depot: std::path::PathBuf,
    polls: usize,
    mode: Mode,
    held: std::collections::HashMap<String, (Vec<u8>, usize)>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl PendingDouble {
    /// Start it in front of `server`, answering SUCCESS at the `polls`-th CertPoll.
    pub fn start(server: &ScepServer, polls: usize) -> PendingDouble {
        Self::start_with(server, polls, Mode::Pending)
    }

    /// Start it in front of `server` refusing every RenewalReq (FAILURE badRequest) and
    /// answering a PKCSReq at once.
    pub fn refusing_renewal(server: &ScepServer) -> PendingDouble {
        Self::start_with(server, 0, Mode::RefusingRenewal)
    }

    /// Start it in front of `server` losing the first PKIOperation's answer.
    pub fn losing_first_answer(server: &ScepServer) -> PendingDouble {
        Self::start_with(server, 0, Mode::LosingFirstAnswer { lost: false })
    }

    fn start_with(server: &ScepServer, polls: usize, mode: Mode) -> PendingDouble {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut st = DoubleState {
            upstream: server.url(),
            depot: server.dir.join("depot"),
            polls,
            mode,
            held: Default::default(),
            seen: seen.clone(),
        };
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = st.serve(conn);
            }
        });
        PendingDouble { port, seen }
    }

    /// Its SCEP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/scep", self.port)
    }
}

impl DoubleState {
    fn serve(&mut self, mut conn: std::net::TcpStream) -> std::io::Result<()> {
        use std::io::Write;
        let (head, body) = crate::httpd::read_request(&mut conn);
        let target = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let answer = match self.mode {
            Mode::LosingFirstAnswer { lost } => {
                let op = target.split("operation=").nth(1).unwrap_or_default();
                let post = head.starts_with("POST").then_some(&body[..]);
                let real = curl(&format!("{}?operation={op}", self.upstream), post);
                if let Some(msg) = post {
                    self.seen.lock().unwrap().push(scep_fields(msg).0);
                    if !lost {
                        // The server acted; its answer never reaches the agent.
                        self.mode = Mode::LosingFirstAnswer { lost: true };
                        return Ok(());
                    }
                }
                real
            }
            _ => self.strict(&head, &target),
        };
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-pki-message\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            answer.len()
        )?;
        conn.write_all(&answer)
    }

    /// The answer of the PENDING and refusing modes.
    fn strict(&mut self, head: &str, target: &str) -> Vec<u8> {
        if target.contains("operation=PKIOperation") {
            if head.starts_with("POST") {
                // The capabilities it shows offer no POST (RFC 8894 §4.1: GET is the default).
                b"POST is not offered".to_vec()
            } else {
                self.operation(&message_param(target))
            }
        } else if target.contains("operation=GetCACaps") {
            // The real server's capabilities without POSTPKIOperation (nor SCEPStandard,
            // which implies it): the agent must send by GET.
            let caps = curl(&format!("{}?operation=GetCACaps", self.upstream), None);
            String::from_utf8_lossy(&caps)
                .lines()
                .filter(|l| !matches!(l.trim(), "POSTPKIOperation" | "SCEPStandard"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .into_bytes()
        } else {
            let op = target.split("operation=").nth(1).unwrap_or_default();
            curl(&format!("{}?operation={op}", self.upstream), None)
        }
    }

    fn operation(&mut self, msg: &[u8]) -> Vec<u8> {
        let (kind, txid, nonce) = scep_fields(msg);
        self.seen.lock().unwrap().push(kind.clone());
        // (pkiStatus, failInfo, envelope)
        let (status, fail, envelope) = match kind.as_str() {
            "17" if self.mode == Mode::RefusingRenewal => ("2", Some("2"), None),
            "19" | "17" => {
                let real = curl(
                    &format!("{}?operation=PKIOperation", self.upstream),
                    Some(msg),
                );
                // The real answer, read (and its signature checked) as the agent would.
                let env = message::cert_rep(&real, std::slice::from_ref(&self.ca()), true)
                    .unwrap()
                    .envelope
                    .unwrap();
                if self.polls == 0 {
                    ("0", None, Some(env))
                } else {
                    self.held.insert(txid.clone(), (env, 0));
                    ("3", None, None)
                }
            }
            "20" => match self.held.get_mut(&txid) {
                Some((env, n)) => {
                    *n += 1;
                    if *n >= self.polls {
                        ("0", None, Some(env.clone()))
                    } else {
                        ("3", None, None)
                    }
                }
                None => ("2", Some("4"), None),
            },
            _ => ("2", Some("2"), None),
        };
        self.cert_rep(status, fail, &txid, &nonce, envelope)
    }

    /// The real CA's certificate.
    fn ca(&self) -> x509_cert::Certificate {
        use x509_cert::der::Decode;
        let pem = std::fs::read(self.depot.join("ca.pem")).unwrap();
        let der: rustls::pki_types::CertificateDer =
            rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        x509_cert::Certificate::from_der(der.as_ref()).unwrap()
    }

    fn cert_rep(
        &self,
        status: &str,
        fail_info: Option<&str>,
        txid: &str,
        nonce: &[u8],
        env: Option<Vec<u8>>,
    ) -> Vec<u8> {
        use edge_signer::issuer::scep::message::{signed_message, Fields};
        let ca = self.ca();
        let fields = Fields {
            message_type: "3",
            transaction_id: txid,
            sender_nonce: &[7u8; 16],
            pki_status: Some(status),
            recipient_nonce: Some(nonce),
            fail_info,
        };
        let key = self.depot.join("ca.key");
        signed_message(env, &fields, &ca, &|tbs| Ok(openssl_sign(&key, tbs))).unwrap()
    }
}

/// The `message` query parameter of a GET PKIOperation: percent-decoded, then base64.
fn message_param(target: &str) -> Vec<u8> {
    use base64::Engine;
    let raw = target.split("message=").nth(1).unwrap_or_default();
    let raw = raw.split('&').next().unwrap_or_default().as_bytes();
    let mut text = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap();
            text.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            text.push(raw[i]);
            i += 1;
        }
    }
    base64::engine::general_purpose::STANDARD
        .decode(&text)
        .unwrap_or_default()
}

/// messageType, transactionID and senderNonce of a request.
fn scep_fields(msg: &[u8]) -> (String, String, Vec<u8>) {
    use cms::content_info::ContentInfo;
    use cms::signed_data::SignedData;
    use x509_cert::der::Decode;
    let ci = ContentInfo::from_der(msg).unwrap();
    let sd: SignedData = ci.content.decode_as().unwrap();
    let si = sd.signer_infos.0.iter().next().unwrap();
    let attrs = si.signed_attrs.as_ref().unwrap();
    let get = |oid: &str| {
        attrs
            .iter()
            .find(|a| a.oid.to_string() == oid)
            .and_then(|a| a.values.iter().next())
            .unwrap()
            .value()
            .to_vec()
    };
    (
        String::from_utf8_lossy(&get("2.16.840.1.113733.1.9.2")).into_owned(),
        String::from_utf8_lossy(&get("2.16.840.1.113733.1.9.7")).into_owned(),
        get("2.16.840.1.113733.1.9.5"),
    )
}

fn curl(url: &str, body: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("curl");
    c.args(["-sS", url])
        .stdout(Stdio::piped())
        .stdin(Stdio::piped());
    if body.is_some() {
        c.args([
            "-H",
            "Content-Type: application/x-pki-message",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body.unwrap_or_default()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap().stdout
}

fn openssl_sign(key: &std::path::Path, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-passin", "pass:", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(data).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap().stdout
}
