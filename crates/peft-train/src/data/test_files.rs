//! Temporary dataset files for tests: [`peft_io::scratch::ScratchFile`], removed on drop.

pub(crate) use peft_io::scratch::ScratchFile as TempFile;
