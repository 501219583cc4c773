//! A small deterministic random generator for the randomised unit tests
//! (xorshift64*): fixed seeds make every failure reproducible.

/// xorshift64* state (never zero).
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
