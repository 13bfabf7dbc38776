//! Links the guest as a freestanding static ELF at 1 MiB (see `link.ld`).
//!
//! Everything needed is a link argument, so a plain `cargo build --release` of this crate,
//! from any directory and with no `.cargo/config.toml`, produces the bootable image.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        format!("-T{dir}/link.ld"),
        "-nostartfiles".into(),
        "-nostdlib".into(),
        "-static".into(),
        "-no-pie".into(),
        "-Wl,--build-id=none".into(),
        "-Wl,-z,noexecstack".into(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
