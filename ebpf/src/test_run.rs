//! `BPF_PROG_TEST_RUN`: runs a loaded program on a packet we give it, in the kernel, without
//! attaching it anywhere. Tests use it to check every verdict and rewrite byte for byte; the
//! benchmark uses its timer for nanoseconds per packet.
//!
//! aya does not wrap this command, so it is the `bpf(2)` system call with the `test` member of
//! `union bpf_attr` (field order from include/uapi/linux/bpf.h).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::{Error, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// The largest packet a test run returns (one page, as the kernel's XDP test buffer).
pub const MAX_PACKET: usize = 4096;

/// `union bpf_attr`, the `test` member.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `union bpf_attr`, the map-create member (the fields a plain array needs).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u32; 11],
}

/// What one test run gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The program's return value (XDP_PASS, XDP_TX, TC_ACT_OK, TC_ACT_REDIRECT, ...).
    pub retval: u32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
    /// The kernel's timing of the run, in nanoseconds (the average when repeated).
    pub duration_ns: u32,
}

/// Runs the program behind `prog` once per `repeat` on `packet` and returns the last result.
/// The kernel does not restore the packet between repeats, so only the first run sees
/// `packet` as given: time a rewriting path with `repeat = 1` and many calls.
pub fn run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> Result<Outcome> {
    let mut out = vec![0u8; MAX_PACKET];
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestAttr::default()
    };
    // SAFETY: attr points at a TestAttr laid out as the kernel's `test` member, whose data_in
    // and data_out point at buffers of the sizes given, alive for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            std::mem::size_of::<TestAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(Error::Io {
            what: "BPF_PROG_TEST_RUN".to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    out.truncate((attr.data_size_out as usize).min(MAX_PACKET));
    Ok(Outcome {
        retval: attr.retval,
        packet: out,
        duration_ns: attr.duration,
    })
}

/// The file descriptor of a loaded aya program, for [`run`].
pub fn program_fd(program: &aya::programs::Program) -> Result<BorrowedFd<'_>> {
    program
        .fd()
        .map(|fd| fd.as_fd())
        .map_err(|source| Error::Program {
            what: "the program is not loaded".to_string(),
            source,
        })
}

/// Whether a one-entry array map can be created (see [`crate::can_load`]).
pub(crate) fn probe_map_create() -> bool {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..MapCreateAttr::default()
    };
    // SAFETY: attr is laid out as the map-create member of union bpf_attr and lives through
    // the call; a returned descriptor is closed at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut attr as *mut MapCreateAttr,
            std::mem::size_of::<MapCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor this call just created and nothing else owns.
    unsafe { libc::close(fd as libc::c_int) };
    true
}
