//! Where `fetch` may go: a tenant's host allow list, and which IP addresses are public.
//! Every address a request connects to, whether written in the URL or resolved by DNS, and
//! on every redirect, passes [`AddressPolicy::check`].

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// One entry of a tenant's allow list: `api.example.com`, `*.example.com` (subdomains,
/// not the domain itself), `api.example.com:8443` (that port only), `203.0.113.7`,
/// `[2001:db8::1]:443`. Without a port, any port of the host is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostRule {
    pub fn parse(entry: &str) -> Result<HostRule, String> {
        let entry = entry.trim().to_ascii_lowercase();
        let bad =
            || format!("invalid allow-list entry {entry:?}: expected host, *.domain or host:port");
        if entry.is_empty() || entry.contains('/') || entry.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (host.to_owned(), port)
        } else if entry.matches(':').count() > 1 {
            // A bare IPv6 address.
            (entry.clone(), None)
        } else {
            match entry.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (entry.clone(), None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| bad()))
            .transpose()?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(domain) => (domain.to_owned(), true),
            None => (host, false),
        };
        let valid_name = |h: &str| {
            !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
        };
        if !(host.parse::<IpAddr>().is_ok() && !wildcard || valid_name(&host)) {
            return Err(bad());
        }
        Ok(HostRule {
            host,
            wildcard,
            port,
        })
    }

    /// Whether a request to `host` (lowercase, IPv6 without brackets) on `port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

/// Whether any rule of `rules` allows `host:port`.
pub fn allowed(rules: &[HostRule], host: &str, port: u16) -> bool {
    rules.iter().any(|r| r.allows(host, port))
}

/// Which addresses may be connected to: public ones, plus the networks an operator allowed.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// Non-public networks that may be reached anyway (`capabilities.fetch.allow_private`).
    pub allow_private: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self.allow_private.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match non_public(ip) {
            None => Ok(()),
            Some(what) => Err(format!(
                "{ip} is a {what} address; fetch reaches only public addresses unless an \
                 operator allows the network in capabilities.fetch.allow_private"
            )),
        }
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`, deprecated, still
/// routed to the IPv4 address by some stacks) IPv6 addresses are their IPv4 address; `::`
/// and `::1` stay the IPv6 unspecified and loopback addresses.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    match v6.segments() {
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => ip,
        [0, 0, 0, 0, 0, 0, hi, lo] => {
            IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
        }
        _ => ip,
    }
}

/// What kind of non-public address `ip` is, if it is one.
fn non_public(ip: IpAddr) -> Option<&'static str> {
    const V4: &[(&str, &str)] = &[
        ("0.0.0.0/8", "\"this network\""),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    ];
    const V6: &[(&str, &str)] = &[
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b::/96", "NAT64"),
        ("64:ff9b:1::/48", "NAT64"),
        ("100::/64", "discard"),
        ("2001::/23", "protocol assignment"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ];
    let table = if ip.is_ipv4() { V4 } else { V6 };
    table.iter().find_map(|(net, what)| {
        let net: IpNet = net.parse().expect("static network");
        net.contains(&ip).then_some(*what)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> HostRule {
        HostRule::parse(s).unwrap()
    }

    #[test]
    fn rules_match_hosts_ports_and_subdomains() {
        assert!(rule("api.example.com").allows("api.example.com", 443));
        assert!(rule("API.example.com").allows("api.example.com", 8080));
        assert!(!rule("api.example.com").allows("example.com", 443));
        assert!(!rule("api.example.com").allows("api.example.com.evil.net", 443));
        assert!(rule("*.example.com").allows("a.b.example.com", 443));
        assert!(!rule("*.example.com").allows("example.com", 443));
        assert!(!rule("*.example.com").allows("badexample.com", 443));
        assert!(rule("127.0.0.1:8080").allows("127.0.0.1", 8080));
        assert!(!rule("127.0.0.1:8080").allows("127.0.0.1", 8081));
        assert!(rule("[::1]:80").allows("::1", 80));
        assert!(rule("2001:db8::1").allows("2001:db8::1", 1));
        for bad in [
            "",
            "http://x",
            "a/b",
            "x:port",
            "*.1.2.3.4x:",
            "user@host",
            "a..b",
        ] {
            assert!(HostRule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_public_addresses_pass_by_default() {
        let policy = AddressPolicy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "::2",
            "224.0.0.1",
        ] {
            assert!(policy.check(ip.parse().unwrap()).is_err(), "{ip} allowed");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(policy.check(ip.parse().unwrap()).is_ok(), "{ip} refused");
        }
        let err = policy
            .check("169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("link-local"), "{err}");
        let err = policy.check("::127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(err.contains("127.0.0.1 is a loopback"), "{err}");
    }

    #[test]
    fn operators_can_allow_networks() {
        let policy = AddressPolicy {
            allow_private: vec!["127.0.0.1/32".parse().unwrap()],
        };
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("127.0.0.2".parse().unwrap()).is_err());
        assert!(policy.check("169.254.169.254".parse().unwrap()).is_err());
    }
}
