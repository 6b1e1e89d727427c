//! (object level: to be written)
