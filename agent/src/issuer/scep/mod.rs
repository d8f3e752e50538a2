//! SCEP (RFC 8894) as an [`Issuer`]: `submit` sends a PKCSReq (the CSR with the challenge
//! password, signed with a transient certificate of the new key) or, when the CA renews and
//! the current certificate is valid, a RenewalReq signed with it (the challenge, if one is
//! configured, goes in too: some CAs check it on every request); `poll` sends CertPoll for a
//! request the CA left PENDING. The reference the engine keeps is the message kind and the
//! transaction id (a hash of the new key), so a restarted agent polls the same transaction.
//!
//! Messages are message.rs, envelopes envelope.rs, the HTTP side client.rs.

pub mod client;
pub mod envelope;
pub mod message;

use super::{Issuer, IssuerAnswer, Request, Submitted};
use crate::clock::Unix;
use client::{CaInfo, Server};
use envelope::Legacy;
use firmware_config::schema::ScepIssuer;
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::TokenKey;
use message::{MessageType, Status};
use sha2::Digest;
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

/// A SCEP CA.
pub struct Scep {
    cfg: ScepIssuer,
    anchors: Vec<CertificateDer<'static>>,
    server: Server,
    /// GetCACaps and GetCACert, asked once per process (again after a failed exchange).
    ca: Option<CaInfo>,
}

/// The transaction id of a request for the key with `spki`: hex SHA-256 of it (RFC 8894
/// §3.2.1.1), the same after a restart.
pub fn transaction_id(spki: &[u8]) -> String {
    sha2::Sha256::digest(spki)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

fn kind_name(kind: MessageType) -> &'static str {
    match kind {
        MessageType::PkcsReq => "PKCSReq",
        MessageType::RenewalReq => "RenewalReq",
        MessageType::CertPoll => "CertPoll",
    }
}

/// A certificate chain from a CertRep's certs-only content: the certificate for `spki`
/// first, the others after it, as PEM.
fn chain_for(certs: &[Certificate], spki: &[u8]) -> Result<String, String> {
    let ders: Vec<Vec<u8>> = certs.iter().filter_map(|c| c.to_der().ok()).collect();
    let is_ours = |d: &Vec<u8>| crate::validate::cert_spki(d).as_deref() == Some(spki);
    let leaf = ders
        .iter()
        .find(|d| is_ours(d))
        .ok_or("the CA's answer holds no certificate for the requested key")?;
    let mut chain = vec![CertificateDer::from(leaf.clone())];
    chain.extend(
        ders.iter()
            .filter(|d| !is_ours(d))
            .map(|d| CertificateDer::from(d.clone())),
    );
    Ok(crate::validate::to_pem(&chain))
}

/// Who signs a request and opens its answer.
struct Signer<'a> {
    key: &'a TokenKey,
    cert: Certificate,
}

impl Scep {
    /// From config: the CA bundle is read now; the CA is asked at the first request.
    pub fn new(cfg: &ScepIssuer) -> crate::error::Result<Scep> {
        let anchors = crate::tlsconf::load_certs(&cfg.ca_bundle)?;
        let roots = match &cfg.server_ca {
            Some(p) => crate::tlsconf::load_roots(p)?,
            None => crate::tlsconf::roots_of(&anchors)?,
        };
        let server = Server::new(&cfg.url, roots, cfg.timeout.to_std())
            .map_err(|e| crate::err!("issuer {}: {e}", cfg.name))?;
        Ok(Scep {
            cfg: cfg.clone(),
            anchors,
            server,
            ca: None,
        })
    }

    fn legacy(&self) -> Legacy {
        Legacy {
            triple_des: self.cfg.allow_legacy_crypto,
            single_des: self.cfg.allow_des_answer,
        }
    }

    fn ca(&mut self) -> Result<CaInfo, IssuerAnswer> {
        if let Some(ca) = &self.ca {
            return Ok(ca.clone());
        }
        // What the CA shows of itself (its certificates, its capabilities) refused here is
        // a configuration matter, not this request's: retried with backoff, the key kept.
        let ca = self
            .server
            .ca_info(&self.anchors)
            .map_err(|(_, why)| IssuerAnswer::Unreachable(why))?;
        if !ca.caps.aes && !self.cfg.allow_legacy_crypto {
            return Err(IssuerAnswer::Unreachable(
                "the SCEP CA does not offer AES (GetCACaps): refused; set allow_legacy_crypto = true to use 3DES, with a warning".into(),
            ));
        }
        if !ca.caps.sha256 && !self.cfg.allow_legacy_crypto {
            return Err(IssuerAnswer::Unreachable(
                "the SCEP CA does not offer SHA-256 (GetCACaps): refused; set allow_legacy_crypto = true to accept SHA-1, with a warning".into(),
            ));
        }
        self.ca = Some(ca.clone());
        Ok(ca)
    }

    /// Which kind a new request is: RenewalReq when the CA renews and the current
    /// certificate is valid with an RSA key (one made for another issuer may be EC, which
    /// cannot sign a SCEP message), else PKCSReq.
    fn kind_for(ca: &CaInfo, req: &Request) -> MessageType {
        match (&req.current, &req.current_key) {
            (Some(_), Some(k)) if ca.caps.renewal && !k.info().key_type.is_ec() => {
                MessageType::RenewalReq
            }
            _ => MessageType::PkcsReq,
        }
    }

    /// The key and certificate that sign a request of `kind` (and that the answer is
    /// encrypted to).
    fn signer<'a>(&self, kind: MessageType, req: &'a Request) -> Result<Signer<'a>, String> {
        let new_key = req.key.ok_or("SCEP needs the new key")?;
        if kind == MessageType::RenewalReq {
            if let (Some(ck), Some(key)) = (&req.current, &req.current_key) {
                let der = ck
                    .cert
                    .first()
                    .ok_or("the current identity has no certificate")?;
                let cert = Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
                return Ok(Signer { key, cert });
            }
            return Err("a renewal needs the current certificate, which is no longer valid".into());
        }
        let cert = message::transient_cert(new_key, req.identity)?;
        Ok(Signer { key: new_key, cert })
    }

    /// The content of a request of `kind`: the CSR (with the challenge when one is
    /// configured: a RenewalReq needs none by RFC 8894, but some CAs check it on every
    /// request), or CertPoll's IssuerAndSubject.
    fn content(
        &self,
        kind: MessageType,
        req: &Request,
        ca: &CaInfo,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        let csr = super::csr_der(req.csr_pem)?;
        if kind == MessageType::CertPoll {
            let subject = message::csr_subject(&csr)?;
            return Ok(
                message::issuer_and_subject(&ca.ca.tbs_certificate.subject, &subject)?.into(),
            );
        }
        let Some(src) = &self.cfg.challenge else {
            return Ok(csr.into());
        };
        let secret = src.source().read().map_err(|e| match e {
            hsm_shim::Error::Pin {
                source_desc,
                reason,
            } => format!("cannot read the SCEP challenge password from {source_desc}: {reason}"),
            other => format!("the SCEP challenge password: {other}"),
        })?;
        let key = req.key.ok_or("SCEP needs the new key")?;
        message::with_challenge(&csr, key, secret.reveal())
    }

    /// Send one request and read the answer: the chain, a wait, or why not.
    fn exchange(&mut self, call: &Call, req: &Request, now: Unix) -> Reply {
        let ca = match self.ca() {
            Ok(ca) => ca,
            Err(a) => return Reply::Answer(a),
        };
        let r = match self.send(&ca, call, req) {
            Ok((rep, signer)) => self.reply(rep, &signer, call, req, now),
            Err(a) => Reply::Answer(a),
        };
        if matches!(r, Reply::Answer(IssuerAnswer::Unreachable(_))) {
            // The CA may have changed its certificates or capabilities: ask again next time.
            self.ca = None;
        }
        r
    }

    /// Build, sign and send the message of `call`; the CertRep, checked to answer it.
    fn send<'a>(
        &self,
        ca: &CaInfo,
        call: &Call,
        req: &'a Request,
    ) -> Result<(message::CertRep, Signer<'a>), IssuerAnswer> {
        let what = kind_name(call.kind);
        let unreachable = |e: String| IssuerAnswer::Unreachable(format!("SCEP {what}: {e}"));
        let signer = self.signer(call.signed_as, req).map_err(unreachable)?;
        let content = self.content(call.kind, req, ca).map_err(unreachable)?;
        let mut nonce = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        if !ca.caps.aes {
            tracing::warn!("the SCEP CA does not offer AES: the request is encrypted with 3DES (allowed by allow_legacy_crypto)");
        }
        let msg = message::pki_message(
            &message::Fields::request(call.kind, &call.txid, &nonce),
            &content,
            &ca.recipient,
            !ca.caps.aes,
            signer.key,
            &signer.cert,
        )
        .map_err(unreachable)?;
        let body = self.server.operation(&ca.caps, &msg).map_err(failed)?;
        let rep = message::cert_rep(&body, &ca.certs, self.cfg.allow_legacy_crypto)
            .map_err(unreachable)?;
        if rep.transaction_id != call.txid || rep.recipient_nonce != nonce {
            return Err(unreachable(
                "the answer is not to this request (transactionID or nonce differ)".into(),
            ));
        }
        Ok((rep, signer))
    }

    /// What a CertRep says, for the engine.
    fn reply(
        &self,
        rep: message::CertRep,
        signer: &Signer,
        call: &Call,
        req: &Request,
        now: Unix,
    ) -> Reply {
        let (what, txid) = (kind_name(call.kind), &call.txid);
        match rep.status {
            Status::Failure(info) => Reply::Failure(format!(
                "the SCEP CA refused the {what} (transaction {txid}): failInfo {info}"
            )),
            Status::Pending => Reply::Answer(IssuerAnswer::Wait {
                until: now + self.cfg.poll_interval.secs(),
                what: format!(
                    "SCEP transaction {txid} is pending at the CA (a person approves it); CertPoll every {}",
                    self.cfg.poll_interval
                ),
            }),
            Status::Success => {
                let opened = rep
                    .envelope
                    .as_deref()
                    .ok_or_else(|| "no envelope".to_string())
                    .and_then(|e| addressed_to(e, &signer.cert).map(|_| e))
                    .and_then(|e| envelope::open_envelope(e, signer.key, self.legacy()))
                    .and_then(|c| message::certs_only(&c))
                    .and_then(|certs| chain_for(&certs, req.spki));
                Reply::Answer(match opened {
                    Ok(pem) => IssuerAnswer::Issued(pem),
                    Err(e) => IssuerAnswer::Rejected(format!("SCEP {what}: {e}")),
                })
            }
        }
    }
}

/// One message to send: its kind, whose signature it carries (for CertPoll: the original
/// request's), and the transaction.
struct Call {
    kind: MessageType,
    signed_as: MessageType,
    txid: String,
}

/// What one exchange came to.
#[derive(Debug)]
enum Reply {
    /// An answer for the engine.
    Answer(IssuerAnswer),
    /// The CA answered FAILURE (its failInfo named).
    Failure(String),
}

impl Reply {
    fn answer(self) -> IssuerAnswer {
        match self {
            Reply::Answer(a) => a,
            Reply::Failure(why) => IssuerAnswer::Rejected(why),
        }
    }
}

/// The envelope is addressed to `cert` (the certificate that signed the request), so the key
/// that opens it is the one that signed.
fn addressed_to(envelope: &[u8], cert: &Certificate) -> Result<(), String> {
    let ours = (
        cert.tbs_certificate.issuer.to_der().unwrap_or_default(),
        cert.tbs_certificate.serial_number.as_bytes().to_vec(),
    );
    match envelope::recipient(envelope) {
        Some(r) if r == ours => Ok(()),
        Some(_) => Err(
            "the answer is encrypted to another certificate than the one that signed the request"
                .into(),
        ),
        None => Err("the answer's envelope names no key-transport recipient".into()),
    }
}

/// A failed HTTP exchange as the engine takes it.
fn failed((transient, why): client::Failed) -> IssuerAnswer {
    if transient {
        IssuerAnswer::Unreachable(why)
    } else {
        IssuerAnswer::Rejected(why)
    }
}

impl Issuer for Scep {
    fn key_decrypts(&self) -> bool {
        true
    }

    fn submit(&mut self, req: &Request, now: Unix) -> Result<Submitted, IssuerAnswer> {
        let ca = self.ca()?;
        let kind = Self::kind_for(&ca, req);
        let txid = transaction_id(req.spki);
        let call = |kind| Call {
            kind,
            signed_as: kind,
            txid: txid.clone(),
        };
        let (mut kind, mut reply) = (kind, self.exchange(&call(kind), req, now));
        if let (MessageType::RenewalReq, Reply::Failure(why)) = (kind, &reply) {
            // A CA may refuse a renewal it did not issue the current certificate for (an
            // identity moved to this CA): a first enrolment with the challenge instead.
            tracing::warn!("{why}; sending a PKCSReq with the challenge instead");
            kind = MessageType::PkcsReq;
            reply = self.exchange(&call(kind), req, now);
        }
        match reply.answer() {
            a @ (IssuerAnswer::Issued(_) | IssuerAnswer::Wait { .. }) => Ok(Submitted {
                reference: format!("{}:{txid}", kind_name(kind)),
                answer: Some(a),
            }),
            other => Err(other),
        }
    }

    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> IssuerAnswer {
        let (signed_as, txid) = match reference.split_once(':') {
            Some(("RenewalReq", t)) => (MessageType::RenewalReq, t),
            Some(("PKCSReq", t)) => (MessageType::PkcsReq, t),
            _ => {
                return IssuerAnswer::Rejected(format!(
                    "'{reference}' is not a SCEP transaction this agent made"
                ))
            }
        };
        if signed_as == MessageType::RenewalReq && req.current_key.is_none() {
            // CertPoll is signed like the request it asks about; that certificate has lapsed.
            return IssuerAnswer::Rejected(format!(
                "the RenewalReq {txid} is still pending but the certificate that signed it is no longer valid, so CertPoll cannot be signed; a new enrolment (PKCSReq) follows"
            ));
        }
        let call = Call {
            kind: MessageType::CertPoll,
            signed_as,
            txid: txid.to_owned(),
        };
        self.exchange(&call, req, now).answer()
    }

    fn poll_interval(&self) -> Option<u64> {
        Some(self.cfg.poll_interval.secs())
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        self.ca
            .iter()
            .flat_map(|c| c.certs.iter())
            .filter_map(|c| c.to_der().ok())
            .map(CertificateDer::from)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transaction_id_is_the_key_hash_in_hex() {
        let t = transaction_id(b"spki");
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(t, transaction_id(b"spki"));
    }
}
