//! WireGuard's cross-platform userspace API (the text protocol `wg` speaks to a userspace
//! implementation over `/var/run/wireguard/IFACE.sock`), our side of it, without I/O:
//! reading one request within bounds (line length, line count) and writing the `get`
//! answer from a snapshot of the tunnel. It answers `get` only: the group's peers are the
//! host's word, so a `set` is read to its end and refused. It must not touch a socket or
//! the tunnel, and it never writes this node's private key.
//!
//! Whoever can open the socket is root, but a request is still read as hostile: a line
//! longer than [`MAX_LINE`] or a request of more than [`MAX_LINES`] lines is an error, and
//! nothing a client sends is ever allocated beyond one line.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

/// The longest line a request may have. `wg set`'s longest is an `allowed_ip` or a hex
/// key with its name, well under it.
pub const MAX_LINE: usize = 256;
/// The most lines one request may have: a `set` of a large config, which is refused
/// anyway, is read to its end only up to this many.
pub const MAX_LINES: usize = 4096;

/// `errno` for a refused `set`: `wg` prints "Operation not permitted". Negative, as
/// wireguard-go sends it: `wg` takes the value as `-errno`.
pub const EPERM: i32 = -1;
/// `errno` for a request that is not one.
pub const EINVAL: i32 = -22;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    #[error("request line {line} is longer than {MAX_LINE} bytes")]
    ReadLine { line: usize },
    #[error("the request has more than {MAX_LINES} lines")]
    ReadRequest,
    #[error("the request's first line is {0:?}, not `get=1` or `set=1`")]
    ParseOperation(String),
    #[error("request line {line} is not `key=value`")]
    ParseLine { line: usize },
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
}

/// Where reading a request stands after some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The request is not finished: feed more.
    More,
    /// The request ended with its blank line.
    Done(Op),
}

/// Reads one request from bytes as they come. Only the line being read is kept.
#[derive(Debug, Default)]
pub struct RequestReader {
    line: Vec<u8>,
    /// Lines read so far, the blank one excluded.
    lines: usize,
    op: Option<Op>,
    done: Option<Op>,
}

impl RequestReader {
    /// Takes the next bytes. Once the request is done, more bytes are ignored: one
    /// request per connection.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Progress, UapiError> {
        for &b in bytes {
            if let Some(op) = self.done {
                return Ok(Progress::Done(op));
            }
            if b != b'\n' {
                if self.line.len() >= MAX_LINE {
                    return Err(UapiError::ReadLine {
                        line: self.lines + 1,
                    });
                }
                self.line.push(b);
                continue;
            }
            self.end_line()?;
            self.line.clear();
        }
        Ok(match self.done {
            Some(op) => Progress::Done(op),
            None => Progress::More,
        })
    }

    fn end_line(&mut self) -> Result<(), UapiError> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            return match self.op {
                Some(op) => {
                    self.done = Some(op);
                    Ok(())
                }
                None => Err(UapiError::ParseOperation(String::new())),
            };
        }
        self.lines += 1;
        if self.lines > MAX_LINES {
            return Err(UapiError::ReadRequest);
        }
        match self.op {
            None => {
                self.op = Some(match line.as_slice() {
                    b"get=1" => Op::Get,
                    b"set=1" => Op::Set,
                    other => {
                        let shown: String =
                            String::from_utf8_lossy(other).chars().take(32).collect();
                        return Err(UapiError::ParseOperation(shown));
                    }
                });
                Ok(())
            }
            // `get` takes no arguments: anything more is not the protocol.
            Some(Op::Get) => Err(UapiError::ParseLine { line: self.lines }),
            // A `set`'s lines are read to the request's end (so the client sees our
            // answer rather than a broken pipe) and then dropped unread.
            Some(Op::Set) if line.contains(&b'=') => Ok(()),
            Some(Op::Set) => Err(UapiError::ParseLine { line: self.lines }),
        }
    }
}

/// The device as `get` shows it.
#[derive(Debug, Clone, Default)]
pub struct Device {
    pub listen_port: u16,
    pub peers: Vec<Peer>,
}

/// One peer as `get` shows it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Time since the Unix epoch of the last completed handshake; `None` for never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// The answer to `get=1`: the device, each peer, then `errno=0` and the blank line.
/// There is no `private_key` line: this node's secret never leaves it, and `wg` then
/// shows the interface's keys as "(none)" rather than a wrong public key.
pub fn format_get(device: &Device) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "listen_port={}", device.listen_port);
    for p in &device.peers {
        let _ = writeln!(out, "public_key={}", hex(&p.public_key));
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let hs = p.last_handshake.unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", hs.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", hs.subsec_nanos());
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push_str(&format_errno(0));
    out
}

/// The end of an answer: `errno=N` and the blank line.
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(chunks: &[&[u8]]) -> Result<Progress, UapiError> {
        let mut r = RequestReader::default();
        let mut last = Progress::More;
        for c in chunks {
            last = r.feed(c)?;
        }
        Ok(last)
    }

    #[test]
    fn a_get_split_across_reads_is_done_only_at_its_blank_line() {
        let mut r = RequestReader::default();
        assert_eq!(r.feed(b"ge"), Ok(Progress::More));
        assert_eq!(r.feed(b"t=1\n"), Ok(Progress::More));
        assert_eq!(r.feed(b"\n"), Ok(Progress::Done(Op::Get)));
        // What follows the request is ignored, not read as a second one.
        assert_eq!(r.feed(b"garbage\n\n"), Ok(Progress::Done(Op::Get)));
    }

    #[test]
    fn a_set_is_read_to_its_end_and_reported_as_a_set() {
        let req =
            b"set=1\nprivate_key=0000\nlisten_port=1\npublic_key=ab\nallowed_ip=10.0.0.0/8\n\n";
        assert_eq!(read_all(&[req]), Ok(Progress::Done(Op::Set)));
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_before_it_ends() {
        let long = vec![b'a'; MAX_LINE + 1];
        let mut r = RequestReader::default();
        assert_eq!(r.feed(b"set=1\n"), Ok(Progress::More));
        assert_eq!(r.feed(&long), Err(UapiError::ReadLine { line: 2 }));
        // Exactly the bound is a line like any other.
        let mut r = RequestReader::default();
        r.feed(b"set=1\n").unwrap();
        let mut ok = vec![b'k'; MAX_LINE - 2];
        ok.extend_from_slice(b"=1\n");
        assert_eq!(r.feed(&ok), Ok(Progress::More));
    }

    #[test]
    fn a_request_of_more_lines_than_the_bound_is_refused() {
        let mut r = RequestReader::default();
        r.feed(b"set=1\n").unwrap();
        for _ in 1..MAX_LINES {
            assert_eq!(r.feed(b"k=v\n"), Ok(Progress::More));
        }
        assert_eq!(r.feed(b"k=v\n"), Err(UapiError::ReadRequest));
    }

    #[test]
    fn anything_but_get_or_set_first_is_refused() {
        assert_eq!(
            read_all(&[b"get=2\n\n"]),
            Err(UapiError::ParseOperation("get=2".into()))
        );
        assert_eq!(
            read_all(&[b"\n"]),
            Err(UapiError::ParseOperation(String::new()))
        );
        // A get with arguments, and a set line without `=`.
        assert_eq!(
            read_all(&[b"get=1\nx=1\n\n"]),
            Err(UapiError::ParseLine { line: 2 })
        );
        assert_eq!(
            read_all(&[b"set=1\nnonsense\n\n"]),
            Err(UapiError::ParseLine { line: 2 })
        );
    }

    #[test]
    fn the_get_answer_lists_each_peer_in_wg_s_keys_and_never_a_private_key() {
        let mut key = [0u8; 32];
        key[0] = 0xab;
        key[31] = 0x01;
        let device = Device {
            listen_port: 51871,
            peers: vec![
                Peer {
                    public_key: key,
                    endpoint: Some("203.0.113.7:51871".parse().unwrap()),
                    last_handshake: Some(Duration::new(1_700_000_000, 5)),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    persistent_keepalive: 25,
                    allowed_ips: vec![
                        "100.77.0.2/32".parse().unwrap(),
                        "fd00::2/128".parse().unwrap(),
                    ],
                },
                Peer {
                    public_key: [0x11; 32],
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    persistent_keepalive: 25,
                    allowed_ips: vec![],
                },
            ],
        };
        let text = format_get(&device);
        let expected = format!(
            "listen_port=51871\n\
             public_key=ab{}01\nprotocol_version=1\nendpoint=203.0.113.7:51871\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n\
             rx_bytes=10\ntx_bytes=20\npersistent_keepalive_interval=25\n\
             allowed_ip=100.77.0.2/32\nallowed_ip=fd00::2/128\n\
             public_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             rx_bytes=0\ntx_bytes=0\npersistent_keepalive_interval=25\n\
             errno=0\n\n",
            "00".repeat(30),
            "11".repeat(32)
        );
        assert_eq!(text, expected);
        assert!(!text.contains("private_key"));
    }

    #[test]
    fn an_error_answer_is_its_errno_and_the_blank_line() {
        assert_eq!(format_errno(EPERM), "errno=-1\n\n");
    }
}
