//! One module per verb.

pub(crate) mod demo;
pub(crate) mod id;
pub(crate) mod init;
pub(crate) mod peers;
pub(crate) mod run;
pub(crate) mod status;
pub(crate) mod tasks;
pub(crate) mod up;
pub(crate) mod worker;
