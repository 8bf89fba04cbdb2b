//! Exits 0 when PKU is usable on this machine, 1 otherwise (printing why). CI runs it first
//! and sets `MPKVIRT_REQUIRE_PKU=1` only when it succeeds.

fn main() {
    match mpkvirt_sys::detect::pku() {
        Ok(_) => println!("PKU available"),
        Err(reason) => {
            println!("PKU unavailable: {reason}");
            std::process::exit(1);
        }
    }
}
