#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::http_path_parts(data));
