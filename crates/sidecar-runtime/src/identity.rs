//! Which enode this node publishes.

use geth_ipc::{Enode, Host, NodeInfo};

use crate::error::{AdvertiseError, Error};

/// What address the published enode carries (ADVERTISE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertise {
    /// The pod IP (POD_IP).
    PodIp,
    /// A stable DNS name from DNS_TEMPLATE (StatefulSet + headless Service).
    Dns,
    /// Exactly what geth's admin_nodeInfo reports.
    Geth,
}

/// How the advertised address is chosen (resolved from flags at start-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdvertiseMode {
    /// Replace the host with this IP (the pod IP).
    PodIp(std::net::IpAddr),
    /// Replace the host with this DNS name.
    Dns(String),
    /// Keep what geth reports.
    Geth,
}

impl AdvertiseMode {
    /// Resolves the mode from flags. The default is the pod IP when known.
    pub fn resolve(
        advertise: Option<Advertise>,
        pod_ip: Option<&str>,
        dns_template: &str,
        pod: &str,
        service: &str,
        namespace: &str,
    ) -> Result<Self, Error> {
        let pod_ip = pod_ip
            .map(|ip| {
                ip.parse::<std::net::IpAddr>()
                    .map_err(|_| Error::InvalidPodIp(ip.to_owned()))
            })
            .transpose()?;
        match (advertise, pod_ip) {
            (Some(Advertise::PodIp) | None, Some(ip)) => Ok(Self::PodIp(ip)),
            (Some(Advertise::PodIp), None) => Err(Error::PodIpMissing),
            (Some(Advertise::Dns), _) => {
                let name = dns_template
                    .replace("{pod}", pod)
                    .replace("{service}", service)
                    .replace("{namespace}", namespace);
                match name.parse::<Host>() {
                    Ok(Host::Dns(n)) => Ok(Self::Dns(n)),
                    Ok(Host::Ip(_)) => Err(Error::InvalidDnsName {
                        name,
                        why: "an IP address".into(),
                    }),
                    Err(e) => Err(Error::InvalidDnsName {
                        name,
                        why: e.to_string(),
                    }),
                }
            }
            (Some(Advertise::Geth), _) | (None, None) => Ok(Self::Geth),
        }
    }

    /// The enode to publish, from what geth reports.
    pub fn advertised(&self, info: &NodeInfo, port: Option<u16>) -> Result<Enode, AdvertiseError> {
        let reported = info
            .parsed_enode()
            .map_err(|e| AdvertiseError::InvalidEnode(e.to_string()))?;
        let port = port.unwrap_or(if info.ports.listener > 0 {
            info.ports.listener
        } else {
            reported.tcp_port()
        });
        let enode = match self {
            Self::PodIp(ip) => reported.with_host(Host::Ip(*ip)),
            Self::Dns(name) => reported.with_host(Host::Dns(name.clone())),
            Self::Geth => reported,
        }
        .with_tcp_port(port);
        if enode.host().is_local() {
            return Err(AdvertiseError::Unreachable {
                host: enode.host().to_string(),
                enode: enode.to_string(),
            });
        }
        Ok(enode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(enode: &str) -> NodeInfo {
        serde_json::from_value(serde_json::json!({
            "id": "0".repeat(64),
            "name": "Geth/v1.17.5",
            "enode": enode,
            "ip": "127.0.0.1",
            "ports": {"discovery": 0, "listener": 30303},
            "listenAddr": "[::]:30303",
            "protocols": {}
        }))
        .unwrap()
    }

    const KEY: &str = "6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0";

    #[test]
    fn pod_ip_replaces_geths_loopback_address() {
        let i = info(&format!("enode://{KEY}@127.0.0.1:30303?discport=0"));
        let mode = AdvertiseMode::resolve(None, Some("10.1.2.3"), "", "p", "s", "n").unwrap();
        let e = mode.advertised(&i, None).unwrap();
        assert_eq!(
            e.to_string(),
            format!("enode://{KEY}@10.1.2.3:30303?discport=0")
        );
    }

    #[test]
    fn a_loopback_enode_without_pod_ip_is_refused_with_the_fix() {
        let i = info(&format!("enode://{KEY}@127.0.0.1:30303"));
        let mode = AdvertiseMode::resolve(None, None, "", "p", "s", "n").unwrap();
        let err = mode.advertised(&i, None).unwrap_err();
        assert!(err.to_string().contains("POD_IP"), "{err}");
    }

    #[test]
    fn dns_mode_fills_the_template() {
        let mode = AdvertiseMode::resolve(
            Some(Advertise::Dns),
            Some("10.1.2.3"),
            "{pod}.{service}.{namespace}.svc.cluster.local",
            "geth-0",
            "geth",
            "chain",
        )
        .unwrap();
        assert_eq!(
            mode,
            AdvertiseMode::Dns("geth-0.geth.chain.svc.cluster.local".into())
        );
        let i = info(&format!("enode://{KEY}@127.0.0.1:30303"));
        let e = mode.advertised(&i, Some(30304)).unwrap();
        assert_eq!(
            e.to_string(),
            format!("enode://{KEY}@geth-0.geth.chain.svc.cluster.local:30304")
        );
    }

    #[test]
    fn invalid_pod_ip_is_named() {
        let err = AdvertiseMode::resolve(None, Some("nope"), "", "p", "s", "n").unwrap_err();
        assert!(err.to_string().contains("POD_IP=\"nope\""), "{err}");
    }
}
