//! The node's configuration file (`/etc/watchalong.toml` by default): built-in defaults,
//! parsing with unknown keys refused, and validation whose errors name the file, the line
//! and the key. It reads exactly one file and never touches the network or the state dir.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Where the daemon and the CLI look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/watchalong.toml";

/// A stock WireGuard listens on 51820; we stay clear of it so both can run on one router.
pub const DEFAULT_LISTEN_PORT: u16 = 51871;
/// The LAN relay's default TCP port.
pub const DEFAULT_RELAY_PORT: u16 = 51875;
/// The loopback port players open watched files at.
pub const DEFAULT_WATCH_PORT: u16 = 51876;
/// Disk for watched files from other members, kept for the next watch (MiB).
pub const DEFAULT_STREAM_CACHE_MIB: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Carries everything a person needs to fix the file.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub tunnel: TunnelConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
    pub relay: RelayConfig,
    pub watch: WatchConfig,
    pub sync: SyncConfig,
    pub metrics: MetricsConfig,
    /// `[[share]]` tables: the folders this node offers the group.
    #[serde(rename = "share")]
    pub shares: Vec<ShareConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The LAN relay's TCP port (nearby members fetch through it).
    pub port: u16,
    /// Disk the relay may use to cache chunks for nearby members, in MiB.
    pub cache_mib: u64,
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT` to serve `/metrics` on, like "127.0.0.1:9471" (port 0: any free port,
    /// named in the log). Checked by [`Config::parse`], so [`MetricsConfig::listen_addr`]
    /// is `None` only when it is unset.
    pub listen: Option<String>,
}

impl MetricsConfig {
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|l| l.parse().ok())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// The loopback TCP port players open watched files at (0: any free port, shown by
    /// `watchalong watch`).
    pub port: u16,
    /// Pause the room for everyone while one watcher's player waits for data.
    pub pause_when_buffering: bool,
    /// MiB the caches of files watched from other members may keep on disk; the least
    /// recently played go first, never one being played.
    pub cache_mib: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Days a file that sync replaced or deleted here stays in the share's
    /// `.watchalong-versions` folder; 0 keeps none.
    pub keep_versions_days: u64,
    /// Remote deletions that would remove more than this share of a share's files
    /// (within a minute) are held until `watchalong sync release`; 100 turns it off.
    pub max_delete_percent: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            keep_versions_days: 30,
            max_delete_percent: 50,
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            port: DEFAULT_WATCH_PORT,
            pause_when_buffering: true,
            cache_mib: DEFAULT_STREAM_CACHE_MIB,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            port: DEFAULT_RELAY_PORT,
            cache_mib: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub mode: ShareMode,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ShareMode {
    #[default]
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Shown to the other members; defaults to the hostname.
    pub name: String,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub interface: String,
    pub listen_port: u16,
    pub network: Ipv4Net,
    /// How others reach this node (`host:port`); when absent, the link carries the
    /// addresses of this node's interfaces.
    pub endpoint: Option<String>,
    /// The TUN device's MTU: the underlay's MTU minus 80 (WireGuard over IPv6).
    pub mtu: u16,
    /// Whether the tunnel asks the kernel for batches: TUN offloads (TSO, checksums),
    /// UDP GSO and GRO. `auto` uses each one the kernel accepts and falls back per
    /// feature; `off` moves one packet per system call, as a last resort against a
    /// kernel or driver that misbehaves with them.
    pub offload: Offload,
}

/// `[tunnel] offload`: `auto` or `off`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    #[default]
    Auto,
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Members of this group may change the node through the socket (links, removals,
    /// joins, gets, watching); root always may, anyone else who can open it only reads.
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: LogLevel,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: hostname(),
            state_dir: PathBuf::from("/var/lib/watchalong"),
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            interface: "wa0".into(),
            listen_port: DEFAULT_LISTEN_PORT,
            network: Ipv4Net::new(Ipv4Addr::new(100, 77, 0, 0), 16).unwrap_or_default(),
            endpoint: None,
            mtu: 1420,
            offload: Offload::Auto,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/watchalong/control.sock"),
            group: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "watchalong".to_string())
}

impl Config {
    /// Loads `path`. A missing file is an error only when the user named it: the default
    /// path may be absent, and then the built-in defaults apply.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load_at(p.to_path_buf(), true),
            None => Config::load_at(PathBuf::from(DEFAULT_PATH), false),
        }
    }

    fn load_at(path: PathBuf, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&path, &text),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses and validates `text`; `path` is only used to name the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| from_toml(path, text, &e))?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let bad = |table: &str, key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of_key(text, table, key),
            key: format!("{table}.{key}"),
            message,
        };
        let name = &self.node.name;
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(bad(
                "node",
                "name",
                "expected 1 to 63 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        // Members refuse a name that would pass for an address (wire::check_name_form).
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err(bad(
                "node",
                "name",
                "expected a name, not an IP address (it would pass for a member's address)".into(),
            ));
        }
        if !self.node.state_dir.is_absolute() {
            return Err(bad("node", "state_dir", "expected an absolute path".into()));
        }
        let iface = &self.tunnel.interface;
        if iface.is_empty()
            || iface.len() > 15
            || !iface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "tunnel",
                "interface",
                "expected an interface name of 1 to 15 letters, digits, '-' or '_'".into(),
            ));
        }
        if self.tunnel.listen_port == 0 {
            return Err(bad(
                "tunnel",
                "listen_port",
                "expected a port from 1 to 65535 (others must be able to find it)".into(),
            ));
        }
        let net = self.tunnel.network;
        if net.prefix_len() > 30 || net.network() != net.addr() {
            return Err(bad(
                "tunnel",
                "network",
                "expected a network address with a prefix of /30 or shorter, like \"100.77.0.0/16\""
                    .into(),
            ));
        }
        if let Some(ep) = &self.tunnel.endpoint {
            if split_host_port(ep).is_none() {
                return Err(bad(
                    "tunnel",
                    "endpoint",
                    "expected \"HOST:PORT\" naming one host that members can reach, like \"203.0.113.10:51871\" or, for IPv6, \"[2001:db8::1]:51871\" (not ::, ::1, a multicast or a v4-mapped address: write IPv4 as IPv4)".into(),
                ));
            }
        }
        if !self.control.socket.is_absolute() {
            return Err(bad("control", "socket", "expected an absolute path".into()));
        }
        if self.sync.keep_versions_days > 36_500 {
            return Err(bad(
                "sync",
                "keep_versions_days",
                "expected a number of days from 0 (keep none) to 36500".into(),
            ));
        }
        if self.sync.max_delete_percent > 100 {
            return Err(bad(
                "sync",
                "max_delete_percent",
                "expected a percentage from 0 to 100 (100 turns the hold off)".into(),
            ));
        }
        if let Some(g) = &self.control.group {
            let name_like = !g.is_empty()
                && g.len() <= 32
                && g.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !name_like {
                return Err(bad(
                    "control",
                    "group",
                    "expected a group name, like \"films\"".into(),
                ));
            }
        }
        if !(1280..=9000).contains(&self.tunnel.mtu) {
            return Err(bad(
                "tunnel",
                "mtu",
                "expected 1280 to 9000 (1420 suits a 1500-byte underlay)".into(),
            ));
        }
        if let Some(l) = &self.metrics.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(
                    "metrics",
                    "listen",
                    "expected IP:PORT, like \"127.0.0.1:9471\" (an address of this machine, not a name; remove the key to turn metrics off)".into(),
                ));
            }
        }
        if self.relay.port == 0 {
            return Err(bad(
                "relay",
                "port",
                "expected a port from 1 to 65535".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, share) in self.shares.iter().enumerate() {
            let bad_share = |key: &str, message: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of_share_key(text, i, key),
                key: format!("share[{i}].{key}"),
                message,
            };
            let n = &share.name;
            if n.is_empty()
                || n.len() > 63
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                || n.starts_with('.')
            {
                return Err(bad_share(
                    "name",
                    "expected 1 to 63 letters, digits, '-', '_' or '.' (not starting with '.')"
                        .into(),
                ));
            }
            if !seen.insert(n.clone()) {
                return Err(bad_share(
                    "name",
                    format!(
                        "another [[share]] is already called {n:?}; expected a name of its own"
                    ),
                ));
            }
            if !share.path.is_absolute() {
                return Err(bad_share("path", "expected an absolute path".into()));
            }
        }
        Ok(())
    }
}

/// `host:port` with a non-empty host and a non-zero port. An IPv6 literal must be in
/// brackets (`[2001:db8::1]:51871`): unbracketed, `2001:db8::1:51871` could be an
/// address with no port, and brackets around anything else are a typo.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(inner) => {
            let inner = inner.strip_suffix(']')?;
            let ip = inner.parse::<std::net::Ipv6Addr>().ok()?;
            // Members dial it: one host's unicast address, and an IPv4 one written as
            // IPv4 (a v4-mapped literal would put the host's site at `::/64`).
            if ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.to_ipv4_mapped().is_some()
            {
                return None;
            }
            inner
        }
        None if host.contains([':', '[', ']']) => return None,
        None => host,
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// The line of `key` inside the `index`th `[[share]]` table, or that table's header.
fn line_of_share_key(text: &str, index: usize, key: &str) -> usize {
    let mut shares_seen = 0;
    let mut in_it = false;
    let mut header = 1;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            in_it = false;
            if line == "[[share]]" {
                in_it = shares_seen == index;
                if in_it {
                    header = i + 1;
                }
                shares_seen += 1;
            }
            continue;
        }
        if in_it {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return i + 1;
                }
            }
        }
    }
    header
}

fn from_toml(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let mut message = e.message().trim().to_string();
    let (line, key) = match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            (line, key_at(text, span.start, &message))
        }
        None => (1, String::from("(file)")),
    };
    // Some parsers say what is wrong but not what would be right.
    if !message.contains("expected") {
        message.push_str("; expected ");
        message.push_str(expectation(&key));
    }
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        key,
        message,
    }
}

/// What a value of `key` looks like, for errors whose parser did not say.
fn expectation(key: &str) -> &'static str {
    match key {
        "tunnel.network" => "a network like \"100.77.0.0/16\"",
        "tunnel.endpoint" => "\"HOST:PORT\", like \"203.0.113.10:51871\" or \"[2001:db8::1]:51871\"",
        k if k.starts_with("share") => {
            "each [[share]] to have name = \"...\", path = \"/absolute/path\" and mode = \"read-only\" or \"read-write\""
        }
        _ => "valid TOML, as in the commented example config/watchalong.toml",
    }
}

/// Names the key an error points at: the `[table].key` whose line holds the offset.
fn key_at(text: &str, offset: usize, message: &str) -> String {
    // serde names an unknown field in its message; that beats guessing from the line.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let field = &rest[..end];
            let table = table_before(text, offset);
            return if table.is_empty() {
                field.to_string()
            } else {
                format!("{table}.{field}")
            };
        }
    }
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    }
    let key = line.split('=').next().unwrap_or("").trim();
    let table = table_before(text, offset);
    match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key.to_string(),
        (false, false) => format!("{table}.{key}"),
    }
}

fn table_before(text: &str, offset: usize) -> String {
    text[..offset.min(text.len())]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default()
}

/// The 1-based line where `key` is set inside `[table]`, or the table's header line when
/// the key is not written (a default failed validation only if the file changed another key).
fn line_of_key(text: &str, table: &str, key: &str) -> usize {
    let mut current = String::new();
    let mut header_line = 1;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            current = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            if current == table {
                header_line = i + 1;
            }
            continue;
        }
        if current == table {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return i + 1;
                }
            }
        }
    }
    header_line
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse(Path::new("x.toml"), "").unwrap();
        assert_eq!(c.tunnel.listen_port, 51871);
        assert_eq!(c.tunnel.interface, "wa0");
        assert_eq!(c.tunnel.network.to_string(), "100.77.0.0/16");
    }

    #[test]
    fn offload_is_auto_by_default_and_an_unknown_value_names_file_line_and_both_choices() {
        let c = Config::parse(Path::new("x.toml"), "[tunnel]\noffload = \"off\"\n").unwrap();
        assert_eq!(c.tunnel.offload, Offload::Off);
        assert_eq!(Config::default().tunnel.offload, Offload::Auto);
        let text = "[tunnel]\nmtu = 1420\noffload = \"on\"\n";
        let s = Config::parse(Path::new("/etc/w.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(s.starts_with("/etc/w.toml:3: `tunnel.offload`"), "{s}");
        assert!(s.contains("`auto`") && s.contains("`off`"), "{s}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "[node]\nname = \"a\"\n\n[tunnel]\nlisten_prot = 5\n";
        let e = Config::parse(Path::new("/etc/w.toml"), text).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/w.toml:5: `tunnel.listen_prot`"), "{s}");
    }

    #[test]
    fn no_file_at_the_default_path_means_the_built_in_defaults_but_a_named_one_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("watchalong.toml");
        assert_eq!(
            Config::load_at(absent.clone(), false).unwrap(),
            Config::default()
        );
        assert!(matches!(
            Config::load_at(absent, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn bad_network_names_its_line() {
        let text = "[tunnel]\ninterface = \"wa1\"\nnetwork = \"100.77.0.1/16\"\n";
        let e = Config::parse(Path::new("c.toml"), text).unwrap_err();
        assert!(
            e.to_string().starts_with("c.toml:3: `tunnel.network`"),
            "{e}"
        );
    }
}
