//! "Report it once, when it changes": one type for every such place.

/// Holds the last value reported and says when a new one differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnChange<T> {
    last: Option<T>,
}

impl<T> Default for OnChange<T> {
    fn default() -> Self {
        Self { last: None }
    }
}

impl<T: PartialEq> OnChange<T> {
    /// A latch that has reported nothing yet.
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Takes `value`; returns the previous value (`None` inside when there was
    /// none) when `value` differs from it, so the caller reports the change.
    pub fn update(&mut self, value: T) -> Option<Option<T>> {
        if self.last.as_ref() == Some(&value) {
            return None;
        }
        Some(self.last.replace(value))
    }

    /// The value last taken.
    pub fn get(&self) -> Option<&T> {
        self.last.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::OnChange;

    #[test]
    fn a_value_is_reported_once_per_change_with_the_one_it_replaced() {
        let mut l = OnChange::new();
        assert_eq!(l.update(1), Some(None));
        assert_eq!(l.update(1), None);
        assert_eq!(l.update(2), Some(Some(1)));
        assert_eq!(l.get(), Some(&2));
    }
}
