//! Generation-checked handles: every request, fetch and CPU job lives in a
//! [`Slab`], and an event carries its slot and generation, so that a stale
//! event (its request answered, its fetch given up) never touches a reused
//! slot.

/// A slab with generation-checked handles, so that a stale event never
/// touches a reused slot.
#[derive(Debug)]
pub(super) struct Slab<T> {
    items: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    pub(super) fn new() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    pub(super) fn insert(&mut self, v: T) -> (u32, u32) {
        if let Some(id) = self.free.pop() {
            let slot = &mut self.items[id as usize];
            slot.1 = Some(v);
            return (id, slot.0);
        }
        let id = u32::try_from(self.items.len()).unwrap_or(u32::MAX);
        self.items.push((0, Some(v)));
        (id, 0)
    }
    pub(super) fn get(&self, id: u32, gen_: u32) -> Option<&T> {
        match self.items.get(id as usize) {
            Some((g, Some(v))) if *g == gen_ => Some(v),
            _ => None,
        }
    }
    pub(super) fn get_mut(&mut self, id: u32, gen_: u32) -> Option<&mut T> {
        match self.items.get_mut(id as usize) {
            Some((g, Some(v))) if *g == gen_ => Some(v),
            _ => None,
        }
    }
    pub(super) fn remove(&mut self, id: u32, gen_: u32) -> Option<T> {
        let slot = self.items.get_mut(id as usize)?;
        if slot.0 != gen_ || slot.1.is_none() {
            return None;
        }
        slot.0 = slot.0.wrapping_add(1);
        self.free.push(id);
        slot.1.take()
    }
    /// Removes whatever is at `id` (for handles that are never stale).
    pub(super) fn take(&mut self, id: u32) -> Option<T> {
        let g = self.items.get(id as usize)?.0;
        self.remove(id, g)
    }
}
