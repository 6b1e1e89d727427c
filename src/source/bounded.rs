//! (page level: to be written)
