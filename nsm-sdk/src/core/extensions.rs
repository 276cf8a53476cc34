//! A typed map: at most one value per type, looked up without panics.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;

trait CloneAny: Any + Send + Sync {
    fn clone_box(&self) -> Box<dyn CloneAny>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Clone + Send + Sync + 'static> CloneAny for T {
    fn clone_box(&self) -> Box<dyn CloneAny> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Values keyed by their type, one per type. Handlers use a newtype per value
/// (`struct ClientUrl(Url)`), so two handlers never collide and a missing value is an
/// `Option`, never a panic.
#[derive(Default)]
pub struct Extensions {
    map: HashMap<TypeId, Box<dyn CloneAny>>,
}

impl Extensions {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value`, returning the one it replaces.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.map
            .insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|old| old.into_any().downcast().ok().map(|b| *b))
    }

    /// The stored value of type `T`.
    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|b| (**b).as_any().downcast_ref())
    }

    /// The stored value of type `T`, mutably.
    pub fn get_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.map
            .get_mut(&TypeId::of::<T>())
            .and_then(|b| (**b).as_any_mut().downcast_mut())
    }

    /// Removes and returns the value of type `T`.
    pub fn remove<T: 'static>(&mut self) -> Option<T> {
        self.map
            .remove(&TypeId::of::<T>())
            .and_then(|b| b.into_any().downcast().ok().map(|b| *b))
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Clone for Extensions {
    fn clone(&self) -> Self {
        Self {
            map: self
                .map
                .iter()
                .map(|(k, v)| (*k, (**v).clone_box()))
                .collect(),
        }
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct A(u32);
    #[derive(Clone, Debug, PartialEq)]
    struct B(&'static str);

    #[test]
    fn one_value_per_type_and_missing_is_none() {
        let mut e = Extensions::new();
        assert_eq!(e.get::<A>(), None);
        assert_eq!(e.insert(A(1)), None);
        assert_eq!(e.insert(A(2)), Some(A(1)));
        e.insert(B("b"));
        assert_eq!(e.get::<A>(), Some(&A(2)));
        e.get_mut::<A>().unwrap().0 = 3;
        let c = e.clone();
        assert_eq!(e.remove::<A>(), Some(A(3)));
        assert_eq!(e.get::<A>(), None);
        assert_eq!(c.get::<A>(), Some(&A(3)));
        assert_eq!(c.get::<B>(), Some(&B("b")));
    }
}
