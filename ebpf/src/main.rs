//! remocal's kernel side. Each program lives in its own module; they share only
//! the per-CPU counters.
#![no_std]
#![no_main]

mod counters;
mod flows;
mod listeners;
mod mirror;
mod packet;
mod pod_reset;
mod steal;
mod steal_lookup;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible so the verifier lets us call every helper we use.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
