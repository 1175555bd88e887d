//! The `gatebill` binary (the worker commands come with the worker).

fn main() {
    println!("gatebill {}: the billing core is a library for now", env!("CARGO_PKG_VERSION"));
}
