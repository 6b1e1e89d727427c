//! Helpers shared by the object-level tests.
#![allow(dead_code)]

use std::alloc::Layout;

#[allow(unused_imports)] // not every test uses both
pub use testkit::pattern::{check, fill};

pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}
