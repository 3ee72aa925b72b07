"""Host facts: the allocator advice `lm` prints once at start-up."""

from lm import allocator, hardware

GLIBC_ONLY = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def test_the_advice_appears_under_the_system_allocator_only(tmp_path, monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  maps = tmp_path / "maps"
  maps.write_text(GLIBC_ONLY)
  advice = hardware.allocator_advice(str(maps))
  assert advice and "LD_PRELOAD=" in advice and "tcmalloc" in advice  # tests run on CPU
  for library in ("libtcmalloc_minimal.so.4", "libjemalloc.so.2"):
    maps.write_text(GLIBC_ONLY + f"7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/{library}\n")
    assert hardware.allocator_advice(str(maps)) is None
  assert hardware.allocator_advice(str(tmp_path / "absent")) is None  # no /proc: say nothing
  monkeypatch.setenv("GLIBC_TUNABLES", allocator.GLIBC_TUNABLES)  # lm's own settings
  maps.write_text(GLIBC_ONLY)
  assert hardware.allocator_advice(str(maps)) is None
