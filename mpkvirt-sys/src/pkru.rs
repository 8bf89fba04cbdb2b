//! The PKRU value: per-key access rights of one thread.
//!
//! PKRU is a 32-bit per-thread register holding two bits for each of the 16 protection keys
//! (Intel SDM Vol. 3A §2.7):
//!
//! ```text
//!  31 30 29 28                       5  4  3  2  1  0
//! +-----+-----+-------------------+-----+-----+-----+
//! |WD15 |AD15 |        ...        | WD2 | AD2 | WD1 | AD1 | WD0 | AD0 |
//! +-----+-----+-------------------+-----+-----+-----+
//! ```
//!
//! `AD` (access disable) forbids data reads and writes to pages tagged with the key; `WD`
//! (write disable) forbids writes. Rights apply to user-mode data accesses only, never to
//! instruction fetches, and combine with the page protection: an access needs both.
//!
//! This module is pure (no instructions); reading and writing the register is in
//! [`crate::cpu`].

use std::fmt;

use bitflags::bitflags;

use crate::pkey::Pkey;

bitflags! {
    /// The two PKRU bits for one key, with the kernel's names (`PKEY_DISABLE_*`).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct AccessRights: u32 {
        /// `PKEY_DISABLE_ACCESS`: no data reads or writes.
        const DISABLE_ACCESS = 0b01;
        /// `PKEY_DISABLE_WRITE`: no data writes.
        const DISABLE_WRITE = 0b10;
    }
}

impl AccessRights {
    /// Read and write allowed (no bits set).
    pub const READ_WRITE: AccessRights = AccessRights::empty();
    /// Reads allowed, writes disabled.
    pub const READ_ONLY: AccessRights = AccessRights::DISABLE_WRITE;
    /// Neither reads nor writes.
    pub const NONE: AccessRights = AccessRights::DISABLE_ACCESS;

    /// Whether a data read is allowed.
    pub const fn can_read(self) -> bool {
        !self.contains(AccessRights::DISABLE_ACCESS)
    }

    /// Whether a data write is allowed.
    pub const fn can_write(self) -> bool {
        self.is_empty()
    }
}

/// A PKRU value: the access rights of one thread for all 16 keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pkru(u32);

impl Pkru {
    /// Every key readable and writable.
    pub const ALLOW_ALL: Pkru = Pkru(0);
    /// Linux's initial PKRU (`init_pkru_value`): key 0 read-write, keys 1..15 access-disabled.
    /// Threads start with it after `execve`, and signal handlers run with it.
    pub const LINUX_INIT: Pkru = Pkru(0x5555_5554);
    /// Every key access-disabled, including key 0.
    pub const DENY_ALL: Pkru = Pkru(0x5555_5555);

    /// The value with the given register bits.
    pub const fn from_bits(bits: u32) -> Pkru {
        Pkru(bits)
    }

    /// The register bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The rights this value gives `key`.
    pub const fn rights(self, key: Pkey) -> AccessRights {
        AccessRights::from_bits_truncate(self.0 >> (2 * key.index() as u32))
    }

    /// This value with `key`'s rights replaced by `rights`.
    #[must_use]
    pub const fn with(self, key: Pkey, rights: AccessRights) -> Pkru {
        let shift = 2 * key.index() as u32;
        Pkru((self.0 & !(0b11 << shift)) | (rights.bits() << shift))
    }

    /// The bits of the keys in `mask` (a mask of whole 2-bit fields, see [`Pkru::key_mask`])
    /// taken from `other`, the rest from `self`.
    #[must_use]
    pub const fn merge(self, other: Pkru, mask: u32) -> Pkru {
        Pkru((self.0 & !mask) | (other.0 & mask))
    }

    /// The 2-bit field of `key` as a mask over the register.
    pub const fn key_mask(key: Pkey) -> u32 {
        0b11 << (2 * key.index() as u32)
    }
}

impl fmt::Debug for Pkru {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkru({self})")
    }
}

/// Shows the raw value and every key's rights: `rw` read-write, `r-` read-only, `--` none.
///
/// ```
/// # use mpkvirt_sys::Pkru;
/// assert_eq!(
///     Pkru::LINUX_INIT.to_string(),
///     "0x55555554 [0:rw 1:-- 2:-- 3:-- 4:-- 5:-- 6:-- 7:-- 8:-- 9:-- 10:-- 11:-- 12:-- 13:-- 14:-- 15:--]"
/// );
/// ```
impl fmt::Display for Pkru {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x} [", self.0)?;
        for key in Pkey::all() {
            let rights = self.rights(key);
            let text = if !rights.can_read() {
                "--"
            } else if !rights.can_write() {
                "r-"
            } else {
                "rw"
            };
            let sep = if key.index() == 0 { "" } else { " " };
            write!(f, "{sep}{}:{text}", key.index())?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_and_rights_round_trip_for_every_key() {
        for key in Pkey::all() {
            for rights in [
                AccessRights::READ_WRITE,
                AccessRights::READ_ONLY,
                AccessRights::NONE,
            ] {
                let v = Pkru::DENY_ALL.with(key, rights);
                assert_eq!(v.rights(key), rights, "key {key:?}");
                for other in Pkey::all().filter(|k| *k != key) {
                    assert_eq!(v.rights(other), AccessRights::NONE);
                }
            }
        }
    }

    #[test]
    fn linux_init_allows_only_key_zero() {
        assert!(Pkru::LINUX_INIT.rights(Pkey::DEFAULT).can_write());
        for key in Pkey::all().skip(1) {
            assert!(!Pkru::LINUX_INIT.rights(key).can_read());
        }
    }

    #[test]
    fn display_names_each_key() {
        let v = Pkru::ALLOW_ALL
            .with(Pkey::new(3).unwrap(), AccessRights::READ_ONLY)
            .with(Pkey::new(15).unwrap(), AccessRights::NONE);
        let s = v.to_string();
        assert!(s.starts_with("0x40000080 [0:rw "), "{s}");
        assert!(s.contains(" 3:r- "), "{s}");
        assert!(s.ends_with(" 15:--]"), "{s}");
    }

    #[test]
    fn merge_takes_masked_fields() {
        let k2 = Pkey::new(2).unwrap();
        let merged = Pkru::DENY_ALL.merge(Pkru::ALLOW_ALL, Pkru::key_mask(k2));
        assert_eq!(merged.rights(k2), AccessRights::READ_WRITE);
        assert_eq!(merged.rights(Pkey::DEFAULT), AccessRights::NONE);
    }
}
