//! Typed, in-process copies of replayed values, kept beside their encoded records so that
//! later hits of a `Clone` value clone it instead of decoding bytes.
//!
//! The encoded record stays the source of truth: it is what other processes read, what
//! survives a restart, and what a caller of another type decodes (and fails on, as it
//! would without a copy). A copy is made on a key's first hit, from the value that hit
//! decoded, never at completion: most keys are never replayed, and a copy made for each
//! would double the memory of every record for nothing.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// An in-process copy of a replayed value, kept by a store beside the encoded result it was
/// decoded from (see [`Store::keep_copy`](crate::store::Store::keep_copy)).
///
/// Opaque: only the engine makes and reads copies, and only for callers whose value type
/// matches the copy's exactly.
#[derive(Clone)]
pub struct ValueCopy(Arc<Box<dyn Any + Send + Sync>>);

impl fmt::Debug for ValueCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ValueCopy(..)")
    }
}

/// How a call makes and reads copies of its value type: present only where that type is
/// `Clone` (the attribute finds out at compile time, for the concrete type it returns).
pub(crate) struct Copier<T> {
    make: fn(&T) -> ValueCopy,
    take: fn(&ValueCopy) -> Option<T>,
}

impl<T> Clone for Copier<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Copier<T> {}

impl<T: Clone + Send + Sync + 'static> Copier<T> {
    pub(crate) fn new() -> Self {
        Copier {
            // Boxed inside the `Arc`: a thin pointer, so a record without a copy (most of
            // them) carries 8 bytes for it, not 16.
            make: |value| ValueCopy(Arc::new(Box::new(value.clone()))),
            // A copy of another type (a caller of another type on the same key) is not
            // this caller's: it decodes the record instead.
            take: |copy| (**copy.0).downcast_ref::<T>().cloned(),
        }
    }
}

impl<T> Copier<T> {
    /// A copy of `value`, to keep beside its record.
    pub(crate) fn make(self, value: &T) -> ValueCopy {
        (self.make)(value)
    }

    /// A clone of the copy's value, if it is of this type.
    pub(crate) fn take(self, copy: &ValueCopy) -> Option<T> {
        (self.take)(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_taken_only_as_its_own_type() {
        let copier = Copier::<String>::new();
        let copy = copier.make(&"pay_1".to_owned());
        assert_eq!(copier.take(&copy).as_deref(), Some("pay_1"));
        assert_eq!(Copier::<u64>::new().take(&copy), None);
    }
}
