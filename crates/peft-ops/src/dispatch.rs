//! Run-time backend dispatch: whether a generic `B: Backend` is one of the backends this crate
//! has fast paths for (a `TypeId` comparison), and the kernels those fast paths name.

use std::any::{Any, TypeId};

/// Whether `A` and `T` are the same type.
pub fn is<A: 'static, T: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<T>()
}

/// `a` as a `T` when that is its type, else `a` back.
pub fn downcast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let boxed: Box<dyn Any> = Box::new(a);
    match boxed.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(boxed) => Err(*boxed
            .downcast::<A>()
            .unwrap_or_else(|_| unreachable!("a box holds the type it was made from"))),
    }
}

/// `a` as the `T` it is known to be (a backend checked with [`is`], or on a partner operand).
pub fn cast<A: 'static, T: 'static>(a: A) -> T {
    downcast::<A, T>(a).unwrap_or_else(|_| unreachable!("the backend was checked"))
}

/// A kernel of `kernels.rs` and its scalar parameters.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kernel {
    /// `[scores]` or `[scores, bias]` → `[probabilities]`.
    SoftmaxForward {
        /// Multiplies the scores before the softmax.
        scale: f32,
    },
    /// `[probabilities, d probabilities]` → `[d scores]`.
    SoftmaxBackward {
        /// The forward pass's scale.
        scale: f32,
    },
    /// `[x, weight]` → `[y, 1/rms (f32)]`.
    RmsNormForward {
        /// Added to the mean square.
        eps: f32,
    },
    /// `[x, weight, dy, 1/rms]` → `[dx]`.
    RmsNormBackward,
    /// `[gate, up]` → `[y]`.
    SwigluForward,
    /// `[gate, up, dy]` → `[d gate, d up]`.
    SwigluBackward,
    /// `[x, cos, sin]` → `[y]`.
    RopeForward,
    /// `[dy, cos, sin]` → `[dx]`.
    RopeBackward,
}
