//! Who is calling: the organisation named by the verified client certificate.

use tonic::Request;

use crate::room::RoomError;

/// The calling organisation, taken from the first (leaf) client certificate.
/// TLS has already verified the chain against the server's client CA.
pub(crate) fn caller<T>(request: &Request<T>) -> Result<String, RoomError> {
    let certs = request
        .peer_certs()
        .filter(|c| !c.is_empty())
        .ok_or(RoomError::NoClientCertificate)?;
    crate::certs::organisation_of(certs[0].as_ref()).ok_or(RoomError::NoOrganisation)
}
