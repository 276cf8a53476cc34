//! The gRPC codec of every NSM service: prost, with smaller buffers than tonic's.
//!
//! tonic allocates each RPC's encode and decode buffers up front, 8 KiB each by
//! default. NSM keeps long-lived streams per connection (a client's MonitorConnection,
//! the relays between hops, watching Finds), so that size is paid per connection and
//! per stream end: most of a manager's memory per connection. NSM messages are
//! small (a connection with a four-hop path encodes to well under 2 KiB), so the
//! buffers start at [`BUFFER_SIZE`] and grow in steps of that size when a larger
//! message comes.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The initial size (and growth step) of each RPC's encode and decode buffers.
pub const BUFFER_SIZE: usize = 1024;

/// How much may be encoded before a stream yields to let the transport send
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct NsmCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for NsmCodec<T, U> {
    fn default() -> Self {
        NsmCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for NsmCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
