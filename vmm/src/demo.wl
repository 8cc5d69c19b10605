# The built-in demo: three processes, each with its own page tables. At every sync the
# VMM prints, per process, how many mapped pages were written since the previous sync
# (found from outside, without the guest's help), then clears.
#
# writer fills 64 pages, then rewrites 8 of them, then 16 others; reader maps the same
# virtual addresses read-only in its own address space and only reads; hugey writes one
# 4 KiB piece of a 2 MiB page, which dirties all 512 entries, as in Linux.
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
check 0x400000 8 0x22
sync final
exit 0

proc reader
map 0x400000 64 ro
touch 0x400000 64
check 0x400000 64 0
loop 50
  touch 0x400000 64
  yield
end
exit 0

proc hugey
map 0x40000000 512 huge
fill 0x40000000 1 0x44
check 0x40001000 511 0
loop 50
  check 0x40000000 1 0x44
  yield
end
fill 0x40100000 1 0x45
loop 50
  yield
end
exit 0
