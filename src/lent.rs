//! A value lent to the thread while a future is polled: what a call's handler and log lines
//! read of the call (its caller, its labels) without an allocation or a move per poll.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use scoped_tls::ScopedKey;

pin_project_lite::pin_project! {
    /// `future`, polled with `value` set in `key` (see [`lend`]).
    pub struct Lent<T: 'static, F> {
        key: &'static ScopedKey<T>,
        value: T,
        #[pin]
        future: F,
    }
}

/// `future`, with `value` readable through `key` on this thread during each of its polls
/// (and only then: a task it spawns, or code after it returns `Pending`, sees none).
pub fn lend<T: 'static, F: Future>(key: &'static ScopedKey<T>, value: T, future: F) -> Lent<T, F> {
    Lent { key, value, future }
}

impl<T: 'static, F: Future> Future for Lent<T, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.key.set(this.value, || this.future.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    scoped_tls::scoped_thread_local!(static LENT: u32);

    fn read() -> Option<u32> {
        LENT.is_set().then(|| LENT.with(|value| *value))
    }

    #[test]
    fn the_value_is_there_for_every_poll_and_gone_between_them() {
        let mut polls = Vec::new();
        let mut waited = false;
        let future = lend(
            &LENT,
            7,
            std::future::poll_fn(|cx| {
                polls.push(read());
                if waited {
                    Poll::Ready(())
                } else {
                    waited = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }),
        );
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(future.as_mut().poll(&mut cx).is_pending());
        assert_eq!(read(), None, "not lent between polls");
        assert!(future.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls, [Some(7), Some(7)]);
        assert_eq!(read(), None);
    }
}
