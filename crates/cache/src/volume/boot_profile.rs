//! Boot-profile recording of a cached volume: the first touch of each chunk
//! by a VM joins the volume's [`BootProfile`], saved beside the volume.

use super::CachedVolume;
use crate::error::CacheError;
use crate::profile::BootProfile;

impl CachedVolume {
    /// Records that a VM read `offset..offset+len` from this volume: the
    /// first touch of each chunk (all-zero chunks aside) joins the boot
    /// profile. Out-of-range parts are ignored.
    pub fn record_boot_read(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size() {
            return;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.size() - 1);
        for i in self.manifest.chunk_of(offset)..=self.manifest.chunk_of(last_byte) {
            if !self.manifest.is_zero_chunk(i) {
                self.profile.touch(i);
            }
        }
    }

    /// The boot profile recorded on this host so far.
    pub fn boot_profile(&self) -> BootProfile {
        self.profile.profile()
    }

    /// Entries in the recorded boot profile (grows as VMs touch new chunks).
    pub fn boot_profile_len(&self) -> u64 {
        self.profile.len()
    }

    /// Writes the boot profile file if it changed since the last save.
    pub fn save_profile(&self) -> Result<(), CacheError> {
        if !self.profile.take_dirty() {
            return Ok(());
        }
        let res = self
            .profile
            .profile()
            .store(&self.profile_path, &self.manifest);
        if res.is_err() {
            self.profile.set_dirty();
        }
        res
    }
}
