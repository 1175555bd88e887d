//! Traffic classification (spec sections 1-2): which outbound bytes of an
//! event travel over the public network and are billed.

use super::event::{AccessEvent, Backend, DecodeError, Network, RejectReason};

/// What one event contributes to its hour's usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metered {
    /// Whether the gateway itself rejected the call (not billable).
    pub frontend_error: bool,
    /// Outbound bytes over the public network (billed).
    pub public_out_bytes: u64,
    /// Outbound bytes over the private network (recorded, free).
    pub private_out_bytes: u64,
    /// Client to gateway plus backend to gateway bytes (recorded, free).
    pub inbound_bytes: u64,
}

/// The fields of an event that classification reads, borrowed: the decoder's
/// fast path builds it straight from the message bytes.
#[derive(Clone, Copy, Debug)]
pub struct Legs<'a> {
    /// Region of the API service.
    pub region: &'a str,
    /// How the client reached the gateway.
    pub client_network: Network,
    /// Rejected by the gateway itself.
    pub frontend_error: bool,
    /// Client to gateway bytes.
    pub request_bytes: u64,
    /// Gateway to client bytes.
    pub response_bytes: u64,
    /// The backend leg.
    pub backend: BackendRef<'a>,
}

/// A borrowed [`Backend`].
#[derive(Clone, Copy, Debug)]
pub enum BackendRef<'a> {
    /// An HTTP service.
    Http {
        /// Region, when inside the cloud.
        region: Option<&'a str>,
        /// Inside the cloud.
        in_cloud: bool,
        /// Public or private address.
        address: Network,
        /// Gateway to backend bytes.
        request_bytes: u64,
        /// Backend to gateway bytes.
        response_bytes: u64,
    },
    /// A serverless cloud function.
    Scf {
        /// Region of the function.
        region: &'a str,
        /// Gateway to function bytes.
        request_bytes: u64,
        /// Function to gateway bytes.
        response_bytes: u64,
    },
    /// A mock backend.
    Mock,
}

impl AccessEvent {
    /// The event's fields as classification reads them.
    pub fn legs(&self) -> Legs<'_> {
        let backend = match &self.backend {
            Backend::Mock => BackendRef::Mock,
            Backend::Http { region, in_cloud, address, request_bytes, response_bytes } => BackendRef::Http {
                region: region.as_deref(),
                in_cloud: *in_cloud,
                address: *address,
                request_bytes: *request_bytes,
                response_bytes: *response_bytes,
            },
            Backend::Scf { region, request_bytes, response_bytes } => {
                BackendRef::Scf { region, request_bytes: *request_bytes, response_bytes: *response_bytes }
            }
        };
        Legs {
            region: &self.region,
            client_network: self.client_network,
            frontend_error: self.frontend_error,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            backend,
        }
    }
}

/// Classifies an event's legs. Fails with `unsupported_traffic_path` for an
/// HTTP backend at a private address outside the API's region or the cloud.
pub fn classify(e: &AccessEvent) -> Result<Metered, DecodeError> {
    classify_legs(&e.legs())
}

/// [`classify`] on a borrowed view.
pub fn classify_legs(e: &Legs<'_>) -> Result<Metered, DecodeError> {
    let mut m = Metered { frontend_error: e.frontend_error, inbound_bytes: e.request_bytes, ..Metered::default() };
    // Leg 1: gateway to client.
    match e.client_network {
        Network::Public => m.public_out_bytes += e.response_bytes,
        Network::Private => m.private_out_bytes += e.response_bytes,
    }
    // Leg 2: gateway to backend.
    match e.backend {
        BackendRef::Mock => {}
        BackendRef::Http { region, in_cloud, address, request_bytes, response_bytes } => {
            let same_region = in_cloud && region == Some(e.region);
            match (same_region, address) {
                (true, Network::Private) => m.private_out_bytes += request_bytes,
                (_, Network::Public) => m.public_out_bytes += request_bytes,
                (false, Network::Private) => {
                    let where_ = if in_cloud {
                        format!("in region `{}`, not the API's region `{}`", region.unwrap_or(""), e.region)
                    } else {
                        "outside the cloud".to_string()
                    };
                    return Err(DecodeError::new(
                        RejectReason::UnsupportedTrafficPath,
                        format!(
                            "http backend {where_} at a private address: the billing rules define no such path; \
                             fix the gateway's backend record or the event and re-send it"
                        ),
                    ));
                }
            }
            m.inbound_bytes += response_bytes;
        }
        BackendRef::Scf { region, request_bytes, response_bytes } => {
            if region == e.region {
                m.private_out_bytes += request_bytes;
            } else {
                m.public_out_bytes += request_bytes;
            }
            m.inbound_bytes += response_bytes;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(region: Option<&str>, in_cloud: bool, address: Network) -> AccessEvent {
        AccessEvent {
            request_id: "r".into(),
            account_id: "a".into(),
            region: "ap-guangzhou".into(),
            time_ms: 0,
            client_network: Network::Public,
            frontend_error: false,
            request_bytes: 100,
            response_bytes: 10_000,
            backend: Backend::Http { region: region.map(String::from), in_cloud, address, request_bytes: 2_000, response_bytes: 9_000 },
        }
    }

    #[test]
    fn http_table_of_section_2() {
        let cases = [
            (Some("ap-guangzhou"), true, Network::Private, Some((10_000, 2_000))),
            (Some("ap-guangzhou"), true, Network::Public, Some((12_000, 0))),
            (Some("ap-beijing"), true, Network::Public, Some((12_000, 0))),
            (None, false, Network::Public, Some((12_000, 0))),
            (Some("ap-beijing"), true, Network::Private, None),
            (None, false, Network::Private, None),
        ];
        for (region, in_cloud, address, expect) in cases {
            let got = classify(&http(region, in_cloud, address));
            match expect {
                Some((public, private)) => {
                    let m = got.unwrap();
                    assert_eq!((m.public_out_bytes, m.private_out_bytes, m.inbound_bytes), (public, private, 9_100));
                }
                None => assert_eq!(got.unwrap_err().reason, RejectReason::UnsupportedTrafficPath),
            }
        }
    }

    #[test]
    fn private_client_leg_is_private() {
        let mut e = http(None, false, Network::Public);
        e.client_network = Network::Private;
        let m = classify(&e).unwrap();
        assert_eq!((m.public_out_bytes, m.private_out_bytes), (2_000, 10_000));
    }
}
