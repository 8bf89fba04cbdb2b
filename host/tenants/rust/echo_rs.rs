//! echo_rs: answers the request as it came (the Rust twin of `tenants/c/echo.c`).
#![no_std]

#[path = "abi.rs"]
#[allow(dead_code, reason = "the ABI module is shared by every Rust tenant")]
mod abi;

#[unsafe(no_mangle)]
pub static mpkvirt_fn_abi_version: u32 = abi::ABI_VERSION;

/// # Safety
///
/// Called by the host as `include/mpkvirt_fn.h` says.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mpkvirt_fn_entry(
    host: *const abi::HostApi,
    request: *const u8,
    request_len: usize,
    response: *mut abi::Response,
) -> i32 {
    // SAFETY: the host's arguments.
    let (host, request, response) = unsafe { abi::args(host, request, request_len, response) };
    let Some(mut out) = abi::Buf::with_capacity(host, request.len()) else {
        return 2;
    };
    for &b in request {
        if out.push(b).is_none() {
            return 2;
        }
    }
    out.respond(response);
    0
}
