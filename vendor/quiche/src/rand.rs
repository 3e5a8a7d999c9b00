// Copyright (C) 2018-2019, Cloudflare, Inc.
// All rights reserved.
//
// Redistribution and use in source and binary forms, with or without
// modification, are permitted provided that the following conditions are
// met:
//
//     * Redistributions of source code must retain the above copyright notice,
//       this list of conditions and the following disclaimer.
//
//     * Redistributions in binary form must reproduce the above copyright
//       notice, this list of conditions and the following disclaimer in the
//       documentation and/or other materials provided with the distribution.
//
// THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS
// IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO,
// THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
// PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
// CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
// EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
// PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
// PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF
// LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING
// NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS
// SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

pub fn rand_bytes(buf: &mut [u8]) {
    if SEEDED.with(|s| s.get()).is_some() {
        seeded_bytes(buf);
        return;
    }
    unsafe {
        RAND_bytes(buf.as_mut_ptr(), buf.len());
    }
}

// h3gate patch (`quiche-thread-clock.patch`): a thread may replace quiche's random numbers
// (packet number skips, PATH_CHALLENGE data, connection IDs…) with a seeded sequence, so a
// simulation on that thread replays exactly. Never for a real connection: these values are
// what makes an off-path attacker's guess fail. TLS keeps BoringSSL's generator.
thread_local! {
    static SEEDED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Makes quiche's random numbers on this thread a sequence fixed by `seed` (`None`: back to
/// BoringSSL's generator).
pub fn set_thread_seed(seed: Option<u64>) {
    SEEDED.with(|s| s.set(seed));
}

fn seeded_bytes(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        // splitmix64
        let z = SEEDED.with(|s| {
            let x = s.get().unwrap_or(0).wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(Some(x));
            x
        });
        let mut z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

pub fn rand_u8() -> u8 {
    let mut buf = [0; 1];

    rand_bytes(&mut buf);

    buf[0]
}

pub fn rand_u64() -> u64 {
    let mut buf = [0; 8];

    rand_bytes(&mut buf);

    u64::from_ne_bytes(buf)
}

pub fn rand_u64_uniform(max: u64) -> u64 {
    let chunk_size = u64::MAX / max;
    let end_of_last_chunk = chunk_size * max;

    let mut r = rand_u64();

    while r >= end_of_last_chunk {
        r = rand_u64();
    }

    r / chunk_size
}

extern "C" {
    fn RAND_bytes(buf: *mut u8, len: libc::size_t) -> libc::c_int;
}
