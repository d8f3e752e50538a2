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
    /// certificate is valid, else PKCSReq.
    fn kind_for(ca: &CaInfo, req: &Request) -> MessageType {
        match (&req.current, &req.current_key) {
            (Some(_), Some(_)) if ca.caps.renewal => MessageType::RenewalReq,
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
        let csr = crate::issuer::acme::csr_der(req.csr_pem)?;
        if kind == MessageType::CertPoll {
            let subject = message::csr_subject(&csr)?;
            return Ok(
                message::issuer_and_subject(&ca.ca.tbs_certificate.subject, &subject)?.into(),
            );
        }
        let Some(src) = &self.cfg.challenge else {
            return Ok(csr.into());
        };
        let secret = src.source().read().map_err(|e| {
            format!(
                "the SCEP challenge password: {}",
                e.to_string().replace("PIN", "secret")
            )
        })?;
        let key = req.key.ok_or("SCEP needs the new key")?;
        message::with_challenge(&csr, key, secret.reveal())
    }

    /// Send one request of `kind` under `txid` (the signer of `signed_as`) and read the
    /// answer: the chain, a wait, or why not.
    fn exchange(
        &mut self,
        kind: MessageType,
        signed_as: MessageType,
        req: &Request,
        txid: &str,
        now: Unix,
    ) -> IssuerAnswer {
        let ca = match self.ca() {
            Ok(ca) => ca,
            Err(a) => return a,
        };
        let r = self.exchange_with(&ca, kind, signed_as, req, txid, now);
        if matches!(r, IssuerAnswer::Unreachable(_)) {
            // The CA may have changed its certificates or capabilities: ask again next time.
            self.ca = None;
        }
        r
    }

    fn exchange_with(
        &self,
        ca: &CaInfo,
        kind: MessageType,
        signed_as: MessageType,
        req: &Request,
        txid: &str,
        now: Unix,
    ) -> IssuerAnswer {
        let what = kind_name(kind);
        let built = (|| {
            let signer = self.signer(signed_as, req)?;
            let content = self.content(kind, req, ca)?;
            let mut nonce = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
            let msg = message::pki_message(
                kind,
                &content,
                &ca.recipient,
                signer.key,
                &signer.cert,
                txid,
                &nonce,
            )?;
            Ok::<_, String>((signer, msg, nonce))
        })();
        let (signer, msg, nonce) = match built {
            Ok(x) => x,
            Err(e) => return IssuerAnswer::Unreachable(format!("SCEP {what}: {e}")),
        };
        let body = match self.server.operation(&ca.caps, &msg) {
            Ok(b) => b,
            Err(f) => return failed(f),
        };
        let rep = match message::cert_rep(&body, &ca.certs, self.cfg.allow_legacy_crypto) {
            Ok(r) => r,
            Err(e) => return IssuerAnswer::Unreachable(format!("SCEP {what}: {e}")),
        };
        if rep.transaction_id != txid || rep.recipient_nonce != nonce {
            return IssuerAnswer::Unreachable(format!(
                "SCEP {what}: the answer is not to this request (transactionID or nonce differ)"
            ));
        }
        match rep.status {
            Status::Failure(info) => IssuerAnswer::Rejected(format!(
                "the SCEP CA refused the {what} (transaction {txid}): failInfo {info}"
            )),
            Status::Pending => IssuerAnswer::Wait {
                until: now + self.cfg.poll_interval.secs(),
                what: format!(
                    "SCEP transaction {txid} is pending at the CA (a person approves it); CertPoll every {}",
                    self.cfg.poll_interval
                ),
            },
            Status::Success => {
                let opened = rep
                    .envelope
                    .as_deref()
                    .ok_or_else(|| "no envelope".to_string())
                    .and_then(|e| addressed_to(e, &signer.cert).map(|_| e))
                    .and_then(|e| envelope::open_envelope(e, signer.key, self.legacy()))
                    .and_then(|c| message::certs_only(&c))
                    .and_then(|certs| chain_for(&certs, req.spki));
                match opened {
                    Ok(pem) => IssuerAnswer::Issued(pem),
                    Err(e) => IssuerAnswer::Rejected(format!("SCEP {what}: {e}")),
                }
            }
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
        let reference = format!("{}:{txid}", kind_name(kind));
        match self.exchange(kind, kind, req, &txid, now) {
            a @ (IssuerAnswer::Issued(_) | IssuerAnswer::Wait { .. }) => Ok(Submitted {
                reference,
                answer: Some(a),
            }),
            other => Err(other),
        }
    }

    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> IssuerAnswer {
        let (kind, txid) = match reference.split_once(':') {
            Some(("RenewalReq", t)) => (MessageType::RenewalReq, t),
            Some(("PKCSReq", t)) => (MessageType::PkcsReq, t),
            _ => {
                return IssuerAnswer::Rejected(format!(
                    "'{reference}' is not a SCEP transaction this agent made"
                ))
            }
        };
        self.exchange(MessageType::CertPoll, kind, req, txid, now)
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
