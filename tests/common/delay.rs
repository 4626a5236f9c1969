//! The lab's delay element: a namespace of its own spliced into one link, holding every
//! frame that crosses it for a fixed one-way delay, each way, whatever its protocol (ping
//! sees it as well as WireGuard's UDP). It owns that namespace, its two veths and the
//! forwarding threads, and removes them on drop. It shapes nothing and reorders nothing:
//! rates stay with `tc` on the link's ends (`Lab::shape_wan`, `Node::shape`), beside it.
//!
//! How: one AF_PACKET socket per veth, with a virtio-net header on every frame so that
//! offloads pass through untouched (a 64 KiB TSO/GRO super-frame and a checksum left to the
//! hardware travel as they came, instead of being too big to send or arriving with a wrong
//! checksum). A reader thread per direction stamps each frame with its due time and a
//! sender thread writes it to the other veth when that time comes.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{in_netns, must, Netns};

/// `linux/if_packet.h`: a virtio-net header before every frame read and written.
const PACKET_VNET_HDR: libc::c_int = 15;
/// `linux/if_packet.h` (Linux 4.20): do not read back what this interface sends.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// What one direction may hold at once, like a router's buffer: beyond it frames are
/// dropped at the tail. 8 MiB is the frames in flight of 1.7 Gbit/s at the longest delay
/// the benches use (150 ms round trip, 37.5 ms per link each way), so the line itself is
/// never what limits a measured rate.
const QUEUE_BYTES: usize = 8 << 20;

/// One read: a virtio-net header and a frame of up to 64 KiB (a GSO super-frame), with
/// room to spare; anything longer is dropped and counted.
const FRAME_BUF: usize = 256 << 10;

/// How often a blocked reader or sender looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Frames a delay element let through and dropped, over both directions.
#[derive(Default)]
pub struct DelayCounts {
    pub forwarded: AtomicU64,
    /// Dropped because the queue held [`QUEUE_BYTES`] already.
    pub queue_full: AtomicU64,
    /// Dropped because the frame was longer than the read buffer or could not be sent.
    pub failed: AtomicU64,
}

/// A delay spliced into one link; everything it made goes on drop.
pub struct Delay {
    pub one_way: Duration,
    pub counts: Arc<DelayCounts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Last, so the sockets (which keep it alive) are closed before it is deleted.
    ns: Netns,
}

/// Frames waiting in one direction, oldest (soonest due) first.
struct Line {
    frames: Mutex<Waiting>,
    arrived: Condvar,
}

#[derive(Default)]
struct Waiting {
    queue: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

impl Delay {
    /// Joins `inner_dev` in namespace `inner_ns` and `outer_dev` in `outer_ns` (both
    /// created here, as veths, with `mtu`) through a new namespace that holds each frame
    /// `one_way` in each direction. The caller configures addresses and bridges as it
    /// would for a plain veth pair between the two.
    pub fn splice(
        inner_ns: &str,
        inner_dev: &str,
        outer_ns: &str,
        outer_dev: &str,
        mtu: u16,
        one_way: Duration,
    ) -> Delay {
        let ns = Netns::new("dl");
        let mtu = mtu.to_string();
        for (mine, peer_ns, peer_dev) in [("in", inner_ns, inner_dev), ("out", outer_ns, outer_dev)]
        {
            must(
                "ip",
                &[
                    "-n", &ns.name, "link", "add", mine, "mtu", &mtu, "type", "veth", "peer",
                    "name", peer_dev, "netns", peer_ns, "mtu", &mtu,
                ],
            );
            must("ip", &["-n", &ns.name, "link", "set", mine, "up"]);
        }
        let (inner, outer) = in_netns(&ns.name, || (packet_socket("in"), packet_socket("out")));
        let (inner, outer) = (Arc::new(inner), Arc::new(outer));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(DelayCounts::default());
        let mut threads = Vec::new();
        for (from, to) in [(&inner, &outer), (&outer, &inner)] {
            let line = Arc::new(Line {
                frames: Mutex::new(Waiting::default()),
                arrived: Condvar::new(),
            });
            let (f, l, s, c) = (from.clone(), line.clone(), stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || read(&f, &l, one_way, &s, &c)));
            let (t, s, c) = (to.clone(), stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || send(&t, &line, &s, &c)));
        }
        Delay {
            one_way,
            counts,
            stop,
            threads,
            ns,
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The sockets went with the threads; `ns` is deleted now, and the veths with it.
    }
}

/// An AF_PACKET socket on interface `dev` of the calling thread's namespace, reading every
/// protocol that arrives there (not what it sends), with virtio-net headers.
fn packet_socket(dev: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a new, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let big: libc::c_int = 16 << 20;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    set(
        &fd,
        libc::SOL_PACKET,
        PACKET_VNET_HDR,
        &one,
        "PACKET_VNET_HDR",
    );
    set(
        &fd,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &one,
        "PACKET_IGNORE_OUTGOING",
    );
    // Room for bursts while a reader waits for a core (the machine is shared); FORCE
    // because the default maximum is far smaller, and we are root.
    set(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &big,
        "SO_RCVBUFFORCE",
    );
    set(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        &big,
        "SO_SNDBUFFORCE",
    );
    set(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeout,
        "SO_RCVTIMEO",
    );
    let name = std::ffi::CString::new(dev).expect("interface name");
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {dev} in the delay namespace");
    // SAFETY: sockaddr_ll is plain old data; zeroes are valid for every field.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind to {dev}: {}", std::io::Error::last_os_error());
    fd
}

fn set<T>(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, value: &T, what: &str) {
    // SAFETY: value points to a live T of the length given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {what}: {}",
        std::io::Error::last_os_error()
    );
}

/// Puts the calling thread ahead of ordinary work. The lab shares two cores with
/// compilers and other tests; at normal priority a frame waits behind them for tens of
/// milliseconds now and then, which would be added to the delay it was set to (a real
/// router does not wait for a compiler). Both threads of a line block on a socket or a
/// timer between frames and use little of a core even at 200 Mbit/s, and the kernel's
/// real-time throttling leaves the rest of the machine 5% however busy they get.
fn prioritise() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: pid 0 is the calling thread; param is valid. Without the right to do it the
    // line still works, only less precisely under load, so the result is not needed.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

/// Reads frames from `fd` and queues each, due `delay` after it arrived, until `stop`.
fn read(fd: &OwnedFd, line: &Line, delay: Duration, stop: &AtomicBool, counts: &DelayCounts) {
    prioritise();
    let mut buf = vec![0u8; FRAME_BUF];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is valid for its length; MSG_TRUNC makes recv return the frame's
        // real length, so a truncated one is seen and dropped.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            // A timeout (to look at `stop`), a signal, or the interface going away with
            // its namespace at the end of a test: all end up back at the flag.
            continue;
        };
        if n > buf.len() {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let due = Instant::now() + delay;
        let mut w = line.frames.lock().unwrap_or_else(|p| p.into_inner());
        if w.bytes + n > QUEUE_BYTES {
            counts.queue_full.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let was_empty = w.queue.is_empty();
        w.bytes += n;
        w.queue.push_back((due, buf[..n].to_vec()));
        drop(w);
        // The sender sleeps until the head is due when there is one; it only needs waking
        // when the line was empty.
        if was_empty {
            line.arrived.notify_one();
        }
    }
}

/// Writes each queued frame to `fd` when it is due, until `stop`.
fn send(fd: &OwnedFd, line: &Line, stop: &AtomicBool, counts: &DelayCounts) {
    prioritise();
    let mut due_now = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        {
            let mut w = line.frames.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Every frame gets the same delay, so the queue is in due order: take every
            // frame that is due, or sleep until the head is.
            while w.queue.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, frame)) = w.queue.pop_front() {
                    w.bytes -= frame.len();
                    due_now.push(frame);
                }
            }
            if due_now.is_empty() {
                let wait = w.queue.front().map_or(POLL, |(due, _)| {
                    due.saturating_duration_since(now).min(POLL)
                });
                let _ = line.arrived.wait_timeout(w, wait);
                continue;
            }
        }
        for frame in due_now.drain(..) {
            // SAFETY: frame is valid for its length.
            let r = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if r < 0 {
                counts.failed.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
