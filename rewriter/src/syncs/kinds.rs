//! The kinds of host-sync site `scan --syncs` reports: each is an operation that makes the
//! host wait for the device (the value or the size of a tensor is needed on the host). This
//! is the one documented list (README, "Sync kinds"); a test checks the README against it.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// `.item()`.
    Item,
    /// `.tolist()`.
    Tolist,
    /// `.cpu()`, `.to("cpu")`, `.to(device="cpu")`.
    Cpu,
    /// `.numpy()`.
    Numpy,
    /// `torch.nonzero` / `.nonzero()` (either `as_tuple`), `torch.argwhere`, one-argument
    /// `torch.where(cond)`, `torch.masked_select`: the output's size depends on the values.
    /// (`torch.nonzero_static` has a static size and is not a sync.)
    Nonzero,
    /// `torch.unique` / `.unique()`, `torch.unique_consecutive`: data-dependent size.
    Unique,
    /// `bool(t)`, `int(t)`, `float(t)`, `complex(t)`, `torch.is_nonzero(t)` of a tensor.
    Scalar,
    /// A tensor's truth value: `if t:`, `while t:`, `assert t`, `not t`, `t and ...`,
    /// `a if t else b`, comprehension conditions; `t` a tensor expression (`mask.any()`,
    /// `(a == b).all()`, `torch.any(x)`) or a call to a function that returns one.
    Condition,
    /// `torch.equal`, `torch.allclose` (and the methods): they return a Python bool.
    Equal,
    /// `print(t)` of a tensor.
    Print,
    /// `torch.cuda.synchronize()`, `stream.synchronize()`, `event.synchronize()`.
    Synchronize,
}

impl SyncKind {
    pub const ALL: [SyncKind; 11] = [
        SyncKind::Item,
        SyncKind::Tolist,
        SyncKind::Cpu,
        SyncKind::Numpy,
        SyncKind::Nonzero,
        SyncKind::Unique,
        SyncKind::Scalar,
        SyncKind::Condition,
        SyncKind::Equal,
        SyncKind::Print,
        SyncKind::Synchronize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SyncKind::Item => "item",
            SyncKind::Tolist => "tolist",
            SyncKind::Cpu => "cpu",
            SyncKind::Numpy => "numpy",
            SyncKind::Nonzero => "nonzero",
            SyncKind::Unique => "unique",
            SyncKind::Scalar => "scalar",
            SyncKind::Condition => "condition",
            SyncKind::Equal => "equal",
            SyncKind::Print => "print",
            SyncKind::Synchronize => "synchronize",
        }
    }
}
