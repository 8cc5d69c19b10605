//! Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("migration address {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    Syntax(String),
}

impl std::str::FromStr for Addr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Addr, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Syntax(s.into()));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| Error::Syntax(s.into()))?;
            let port = port.parse().map_err(|_| Error::Syntax(s.into()))?;
            if host.is_empty() {
                return Err(Error::Syntax(s.into()));
            }
            return Ok(Addr::Tcp { host: host.trim_matches(['[', ']']).into(), port });
        }
        Err(Error::Syntax(s.into()))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            // An IPv6 address in brackets, as it is written.
            Addr::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Addr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_documented() {
        assert_eq!("unix:/tmp/m.sock".parse(), Ok(Addr::Unix("/tmp/m.sock".into())));
        assert_eq!("tcp:10.0.0.2:4444".parse(), Ok(Addr::Tcp { host: "10.0.0.2".into(), port: 4444 }));
        assert_eq!("tcp:[::1]:4444".parse(), Ok(Addr::Tcp { host: "::1".into(), port: 4444 }));
        for bad in ["", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "file:/x"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
        for s in ["unix:/tmp/m.sock", "tcp:10.0.0.2:4444", "tcp:[::1]:4444", "tcp:localhost:0"] {
            assert_eq!(s.parse::<Addr>().unwrap().to_string(), s, "printed as written");
        }
    }
}
