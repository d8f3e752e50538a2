//! SCEP (RFC 8894) as an [`super::Issuer`]: messages in message.rs.

pub mod message;
