//! HTTPS as a real apiserver serves it: a throw-away cluster CA, a serving
//! certificate it signed for `127.0.0.1` (IP SAN) and `localhost` (DNS SAN),
//! TLS through rustls with the ring provider, and ALPN `http/1.1` (kube speaks
//! nothing else, and the port-forward WebSocket is an HTTP/1.1 upgrade).
//!
//! Like kube-apiserver (Go's `tls.RequestClientCert`), it asks every client for
//! a certificate but lets the handshake through without one or with one it
//! does not trust: the client must prove it holds the certificate's key, and
//! the request handler then verifies the chain (`client_pki`), so a
//! certificate the fake does not trust is a 401, not a failed handshake.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Every fake's CA has the name of a kubeadm cluster's (as every real cluster's
/// CA has much the same), so only its key tells one fake's CA from another's.
const CA_NAME: &str = "kubernetes";
/// The subject alternative names of the serving certificate.
const SERVER_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];
/// A client that connects and says nothing must not hold a handshake slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One fake's certificates.
pub(super) struct Pki {
    /// The CA certificate, PEM: what a kubeconfig's `certificate-authority-data` holds.
    pub ca_pem: String,
    pub acceptor: TlsAcceptor,
}

impl Pki {
    /// A fresh CA (ECDSA P-256) and a serving certificate signed by it;
    /// `client_verifier` (the client CA's) checks the client's proof of its key.
    pub fn generate(client_verifier: Arc<dyn ClientCertVerifier>) -> Pki {
        let ca_key = KeyPair::generate().expect("generate the fake CA's key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, CA_NAME);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("self-sign the fake CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("generate the fake apiserver's key");
        let mut server_params = CertificateParams::new(SERVER_NAMES.map(String::from).to_vec())
            .expect("serving certificate parameters");
        server_params.distinguished_name = rcgen::DistinguishedName::new();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("sign the serving certificate");

        // The provider is given here, not installed process-wide: the kube clients
        // in the same test process must work with whatever default they find.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions of the ring provider")
            .with_client_cert_verifier(Arc::new(RequestClientCertificate(client_verifier)))
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .expect("serving certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        Pki {
            ca_pem: ca_cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

/// Asks for a client certificate without requiring one or verifying its chain
/// in the handshake (see the module's comment); the client's signature with
/// the certificate's key is still checked.
#[derive(Debug)]
struct RequestClientCertificate(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for RequestClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The certificate chain a connection's client sent (unverified), for the
/// handlers of its requests: axum's connect info of a [`TlsListener`].
#[derive(Debug, Clone, Default)]
pub(super) struct PeerCertificates(pub Option<Arc<[CertificateDer<'static>]>>);

impl Connected<IncomingStream<'_, TlsListener>> for PeerCertificates {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        PeerCertificates(stream.io().get_ref().1.peer_certificates().map(Arc::from))
    }
}

/// A TCP listener that hands axum only connections whose TLS handshake
/// succeeded. Handshakes run concurrently, so a slow or silent client does not
/// hold up the others; a failed one (say, a client that rejects the
/// certificate) is dropped.
pub(super) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<(io::Result<TlsStream<TcpStream>>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        TlsListener {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // Cancel-safe, as axum needs (it races this against shutdown): both
    // `TcpListener::accept` and `JoinSet::join_next` are.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let handshake = self.acceptor.accept(stream);
                        self.handshakes.spawn(async move {
                            let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                                Ok(result) => result,
                                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
                            };
                            (result, peer)
                        });
                    }
                    // As axum does for a plain listener: out of file descriptors
                    // and the like pass, so wait a little and go on.
                    Err(e) => {
                        eprintln!("fake apiserver: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => match done {
                    Ok((Ok(stream), peer)) => return (stream, peer),
                    // A client that refuses our certificate ends here: expected in
                    // the tests that check verification, so only a note.
                    Ok((Err(e), peer)) => eprintln!("fake apiserver: TLS handshake with {peer}: {e}"),
                    Err(e) => eprintln!("fake apiserver: TLS handshake task: {e}"),
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
