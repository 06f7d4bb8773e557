//! What client and agent agree on to authenticate a call (see the service's
//! comment in remocal.proto).

/// Metadata of an UNAUTHENTICATED answer: a fresh challenge (binary, so
/// base64 on the wire) for users of client certificates to sign.
pub const CHALLENGE_METADATA: &str = "remocal-challenge-bin";

/// `authorization: Remocal-Certificate BASE64(CertificateProof)`.
pub const CERTIFICATE_SCHEME: &str = "Remocal-Certificate";

/// What a certificate user signs: a fixed context, so the signature can never
/// be mistaken for one made for anything else (a TLS handshake, say), then
/// the agent's challenge.
pub fn signed_message(challenge: &[u8]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"remocal-agent-challenge-v1:";
    [CONTEXT, challenge].concat()
}
