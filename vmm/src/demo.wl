# The built-in demo: three processes, each with its own page tables.
# writer fills and rewrites a region; reader maps the same virtual addresses in its own
# address space (different frames) and only reads; hugey uses a 2 MiB page.
proc writer
map 0x400000 64
fill 0x400000 64 0x11
sync start
loop 3
  fill 0x400000 8 0x22
  check 0x400000 8 0x22
  check 0x408000 56 0x11
  yield
end
sync round
fill 0x410000 16 0x33
check 0x410000 16 0x33
exit 0

proc reader
map 0x400000 64 ro
touch 0x400000 64
check 0x400000 64 0
loop 3
  yield
end
exit 0

proc hugey
map 0x40000000 512 huge
fill 0x40000000 1 0x44
check 0x40001000 511 0
yield
check 0x40000000 1 0x44
exit 0
