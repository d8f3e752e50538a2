//! The daemon's control plane: what wakes the engine thread (the one writer of the register),
//! the requests the API, the serial console and the fleet channel hand it, and how they wait
//! for its answer.

/// What the engine thread is told to do: the one channel into it.
#[derive(Debug)]
pub enum EngineCommand {
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGTERM/SIGINT.
    Stop,
    /// A request from the API, the serial console or the fleet channel, answered on `Reply`.
    Request(EngineRequest, Reply),
}

/// What the API asks the engine to do (the engine is the one writer of the register).
pub enum EngineRequest {
    /// Rotate now (queued during an overlap).
    Rotate(String),
    /// Retire a generation.
    Retire(String, u32),
    /// Revoke a generation.
    Revoke(String, u32),
    /// Apply a signed bundle that came through a channel (then reload).
    Apply(Vec<u8>, firmware_config::Channel),
}

impl std::fmt::Debug for EngineRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineRequest::Rotate(n) => write!(f, "rotate {n}"),
            EngineRequest::Retire(n, g) => write!(f, "retire {n} generation {g}"),
            EngineRequest::Revoke(n, g) => write!(f, "revoke {n} generation {g}"),
            EngineRequest::Apply(b, c) => {
                write!(f, "apply a bundle of {} bytes from the {c}", b.len())
            }
        }
    }
}

/// What the engine did for a request. Serialized, it is the API's JSON answer (the field
/// names are the wire format: `{"queued": name}`, `{"identity": name, "retired": n}`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// A rotation of the identity is queued (it starts at once unless an overlap runs).
    Queued {
        /// The identity.
        queued: String,
    },
    /// A generation was retired.
    Retired {
        /// The identity.
        identity: String,
        /// The generation.
        retired: u32,
    },
    /// A generation was revoked.
    Revoked {
        /// The identity.
        identity: String,
        /// The generation.
        revoked: u32,
    },
    /// A signed bundle is in effect (applied now, or already).
    Applied(firmware_config::Applied),
}

/// The engine's answer to a request: what it did, or why not.
pub type EngineAnswer = Result<Outcome, String>;

/// Where the engine answers a request. Each asker waits its own way: the API and the fleet
/// channel on a tokio oneshot (`ask`: no thread is held while the engine works, up to a
/// minute), the serial console on its own thread.
pub struct Reply(Box<dyn FnOnce(EngineAnswer) + Send>);

impl Reply {
    /// A reply to wait for on a thread of the asker's own.
    pub fn blocking() -> (Reply, std::sync::mpsc::Receiver<EngineAnswer>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        (
            Reply(Box::new(move |a| {
                let _ = tx.send(a);
            })),
            rx,
        )
    }

    /// Give the asker the engine's answer (nothing happens when it stopped waiting).
    pub fn send(self, answer: EngineAnswer) {
        (self.0)(answer)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// Why an asker got no answer from the engine.
#[derive(Debug, PartialEq)]
pub enum Unanswered {
    /// The engine is stopping (its queue or the reply was dropped).
    Stopping,
    /// No answer within the asker's limit.
    Late,
}

/// Ask the engine from async code and wait up to `limit` for its answer, holding no thread.
pub async fn ask(
    wake: &std::sync::mpsc::Sender<EngineCommand>,
    req: EngineRequest,
    limit: std::time::Duration,
) -> Result<EngineAnswer, Unanswered> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reply = Reply(Box::new(move |a| {
        let _ = tx.send(a);
    }));
    wake.send(EngineCommand::Request(req, reply))
        .map_err(|_| Unanswered::Stopping)?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(Unanswered::Stopping),
        Err(_) => Err(Unanswered::Late),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An engine thread that takes one request and does `what` with its reply.
    fn engine(what: fn(Reply)) -> std::sync::mpsc::Sender<EngineCommand> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(EngineCommand::Request(_, reply)) = rx.recv() {
                what(reply);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        tx
    }

    fn rotate() -> EngineRequest {
        EngineRequest::Rotate("gw".into())
    }

    fn queued() -> Outcome {
        Outcome::Queued {
            queued: "gw".into(),
        }
    }

    #[test]
    fn outcomes_serialize_as_the_api_answers() {
        let json = |o: &Outcome| serde_json::to_string(o).unwrap();
        assert_eq!(json(&queued()), r#"{"queued":"gw"}"#);
        let retired = Outcome::Retired {
            identity: "gw".into(),
            retired: 2,
        };
        assert_eq!(json(&retired), r#"{"identity":"gw","retired":2}"#);
        let revoked = Outcome::Revoked {
            identity: "gw".into(),
            revoked: 3,
        };
        assert_eq!(json(&revoked), r#"{"identity":"gw","revoked":3}"#);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_answer_comes_back_and_each_way_of_not_answering_is_told_apart() {
        let answered = engine(|r| r.send(Ok(queued())));
        let got = ask(&answered, rotate(), Duration::from_secs(5)).await;
        assert_eq!(got, Ok(Ok(queued())));

        let refused = engine(|r| r.send(Err("no such identity".into())));
        let got = ask(&refused, rotate(), Duration::from_secs(5)).await;
        assert_eq!(got, Ok(Err("no such identity".into())));

        // The engine dropped the reply unanswered, or is gone: stopping.
        let dropped = engine(drop);
        let got = ask(&dropped, rotate(), Duration::from_secs(5)).await;
        assert_eq!(got, Err(Unanswered::Stopping));
        let (gone, rx) = std::sync::mpsc::channel();
        drop(rx);
        assert_eq!(
            ask(&gone, rotate(), Duration::from_secs(5)).await,
            Err(Unanswered::Stopping)
        );

        // Busy past the limit: late, and the answer that comes after is dropped unread.
        let busy = engine(|r| {
            std::thread::sleep(Duration::from_millis(200));
            r.send(Ok(queued()));
        });
        let got = ask(&busy, rotate(), Duration::from_millis(50)).await;
        assert_eq!(got, Err(Unanswered::Late));
    }

    #[test]
    fn a_blocking_reply_reaches_its_thread() {
        let (reply, rx) = Reply::blocking();
        std::thread::spawn(move || reply.send(Ok(queued())));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(queued())));
    }
}
