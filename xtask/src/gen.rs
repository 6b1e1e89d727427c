//! `cargo xtask gen-size-classes`: writes `src/object/sizeclass/table.rs` from `goheap::object::sizeclass::gen::render()`.

use std::process::ExitCode;

pub fn main(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("usage: cargo xtask gen-size-classes");
        return ExitCode::from(crate::EXIT_ERROR);
    }
    let path = crate::root().join("src/object/sizeclass/table.rs");
    let text = goheap::object::sizeclass::gen::render();
    let unchanged = std::fs::read_to_string(&path).is_ok_and(|old| old == text);
    if let Err(e) = std::fs::write(&path, &text) {
        eprintln!("writing {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    crate::say!("{} {}", if unchanged { "unchanged:" } else { "wrote" }, path.display());
    ExitCode::SUCCESS
}
