//! Unit tests of the packing pass.
