//! Finding the instructions that change PKRU or the thread pointer in machine code.
//!
//! WRPKRU is unprivileged: any `0F 01 EF` an attacker can jump to — also inside another
//! instruction's bytes — is a way to set PKRU to any value in EAX. The same holds for
//! XRSTOR, which loads PKRU from memory when the saved state includes it, and for
//! WRFSBASE/WRGSBASE, which change the thread pointer mpkvirt tells threads by. Code that may
//! run with a view must therefore contain none of them at *any* byte offset (ERIM's rule),
//! except in mpkvirt's own gates. [`gadgets`] lists them all; the library's tests scan the
//! shipped binaries with it, and a host scans tenant code before loading it.
//!
//! The scan is pure (bytes in, offsets out) and over-approximates: a prefix combination the
//! CPU would reject still counts.

/// Instructions that change PKRU or the FS/GS base.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Gadget {
    /// `0F 01 EF`.
    Wrpkru,
    /// `0F AE /5` with a memory operand (XRSTOR, XRSTOR64 with REX.W).
    Xrstor,
    /// `F3 [REX] 0F AE /2` with a register operand.
    Wrfsbase,
    /// `F3 [REX] 0F AE /3` with a register operand.
    Wrgsbase,
}

fn is_legacy_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
    )
}

/// Every decoding of `code`, at any byte offset, as one of the [`Gadget`]s: `(offset of the
/// first byte an attacker jumps to, kind)`. A prefix or REX byte before an XRSTOR/WRPKRU does
/// not matter (the attacker jumps to the `0F`); WRFSBASE/WRGSBASE need an `F3` among the
/// prefixes before `0F AE` with no `F2` after it (other prefixes and REX in between are
/// accepted: the scan over-approximates rather than miss one).
pub fn gadgets(code: &[u8]) -> Vec<(usize, Gadget)> {
    let mut found = Vec::new();
    for i in 0..code.len().saturating_sub(2) {
        let (a, b, m) = (code[i], code[i + 1], code[i + 2]);
        if a != 0x0f {
            continue;
        }
        let (modrm_mod, reg) = (m >> 6, (m >> 3) & 7);
        match b {
            0x01 if m == 0xef => found.push((i, Gadget::Wrpkru)),
            0xae if modrm_mod != 3 && reg == 5 => found.push((i, Gadget::Xrstor)),
            0xae if modrm_mod == 3 && (reg == 2 || reg == 3) => {
                // Walk back over at most 14 bytes of prefixes.
                let mut j = i;
                let mut f3 = None;
                while j > 0 && i - j < 14 {
                    let p = code[j - 1];
                    if !(is_legacy_prefix(p) || (0x40..=0x4f).contains(&p)) {
                        break;
                    }
                    j -= 1;
                    match p {
                        0xf3 if f3.is_none() => f3 = Some(j),
                        0xf2 if f3.is_none() => break,
                        _ => {}
                    }
                }
                if let Some(at) = f3 {
                    let kind = if reg == 2 {
                        Gadget::Wrfsbase
                    } else {
                        Gadget::Wrgsbase
                    };
                    found.push((at, kind));
                }
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_encoding_at_any_offset_finds_every_encoding_at_any_offset() {
        // Aligned instructions.
        assert_eq!(gadgets(&[0x0f, 0x01, 0xef]), [(0, Gadget::Wrpkru)]);
        assert_eq!(gadgets(&[0x0f, 0xae, 0x2f]), [(0, Gadget::Xrstor)]); // xrstor (%rdi)
        assert_eq!(
            gadgets(&[0x48, 0x0f, 0xae, 0x6f, 0x08]),
            [(1, Gadget::Xrstor)]
        ); // xrstor64 8(%rdi)
        // XRSTORS (`0F C7 /3`) faults outside ring 0: no gadget, not reported (its bytes turn up
        // inside ordinary instructions depending on code layout).
        assert_eq!(gadgets(&[0x0f, 0xc7, 0x1f]), []); // xrstors (%rdi)
        assert_eq!(
            gadgets(&[0xf3, 0x48, 0x0f, 0xae, 0xd0]),
            [(0, Gadget::Wrfsbase)]
        ); // wrfsbase %rax
        assert_eq!(gadgets(&[0xf3, 0x0f, 0xae, 0xdf]), [(0, Gadget::Wrgsbase)]); // wrgsbase %edi
        assert_eq!(
            gadgets(&[0xf3, 0x2e, 0x49, 0x0f, 0xae, 0xd8]),
            [(0, Gadget::Wrgsbase)]
        ); // with an ignored segment prefix
        // Unaligned: inside the immediate of `mov $0x90ef010f, %eax` and of a displacement.
        assert_eq!(
            gadgets(&[0xb8, 0x0f, 0x01, 0xef, 0x90, 0xc3]),
            [(1, Gadget::Wrpkru)]
        );
        assert_eq!(
            gadgets(&[0x48, 0x8b, 0x80, 0x0f, 0xae, 0x28, 0x00]),
            [(3, Gadget::Xrstor)]
        );
        // Look-alikes that are not gadgets: RDPKRU, LFENCE (0F AE /5, mod 3), XSAVE (0F AE /4),
        // RDFSBASE/RDGSBASE, WRFSBASE's bytes without F3 or with a later F2, CMPXCHG16B (0F C7 /1).
        for benign in [
            &[0x0f, 0x01, 0xee][..],
            &[0x0f, 0xae, 0xe8],
            &[0x0f, 0xae, 0x27],
            &[0xf3, 0x48, 0x0f, 0xae, 0xc0],
            &[0xf3, 0x48, 0x0f, 0xae, 0xc8],
            &[0x90, 0x48, 0x0f, 0xae, 0xd0],
            &[0xf3, 0xf2, 0x0f, 0xae, 0xd0],
            &[0x48, 0x0f, 0xc7, 0x0f],
        ] {
            assert_eq!(gadgets(benign), [], "{benign:02x?}");
        }
    }

    proptest::proptest! {
        /// A gadget planted anywhere in arbitrary bytes is found where it was planted,
        /// whatever surrounds it.
        #[test]
        fn a_planted_gadget_is_found_anywhere(
            mut code in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            at in 0usize..256,
            which in 0usize..4,
        ) {
            let at = at.min(code.len());
            let (bytes, kind, start): (&[u8], Gadget, usize) = match which {
                0 => (&[0x0f, 0x01, 0xef], Gadget::Wrpkru, 0),
                1 => (&[0x0f, 0xae, 0x2f], Gadget::Xrstor, 0),
                2 => (&[0xf3, 0x48, 0x0f, 0xae, 0xd0], Gadget::Wrfsbase, 0),
                _ => (&[0xf3, 0x0f, 0xae, 0xdf], Gadget::Wrgsbase, 0),
            };
            code.splice(at..at, bytes.iter().copied());
            let found = gadgets(&code);
            proptest::prop_assert!(
                found.iter().any(|&(o, k)| k == kind && o <= at + start && at + start - o <= 14),
                "{kind:?} planted at {at}: {found:?}"
            );
        }
    }
}
