# The built-in demo: three processes, each with its own page tables. At every sync the
# VMM prints, for the process that reached it, how many of its mapped pages were written
# since that process's previous sync (found from outside, without the guest's help), then
# clears that process's soft-dirty bits. Each process's work between its own syncs runs
# in program order, so every count below is fixed; only the order in which lines of
# different processes appear follows the guest's scheduler.
#
# writer fills 64 pages, then rewrites 8 of them, then 16 others; reader maps the same
# virtual addresses read-only in its own address space and only reads; hugey writes one
# 4 KiB piece of a 2 MiB page, which dirties all 512 entries, as in Linux.
proc writer
map 0x400000 64
fill 0x400000 64 0x11
sync start                  # 64 mapped, 64 soft-dirty: a new mapping, all of it
loop 3
  fill 0x400000 8 0x22
  check 0x400000 8 0x22
  check 0x408000 56 0x11
  yield
end
sync round                  # 8: the same 8 pages, written three times
fill 0x410000 16 0x33
check 0x410000 16 0x33
check 0x400000 8 0x22
sync final                  # 16
exit 0

proc reader
map 0x400000 64 ro
touch 0x400000 64
check 0x400000 64 0
sync reader-mapped          # 64 mapped, 64 soft-dirty: a new mapping
loop 50
  touch 0x400000 64
  check 0x400000 64 0
  yield
end
sync reader-read            # 0: reads dirty nothing
exit 0

proc hugey
map 0x40000000 512 huge
fill 0x40000000 1 0x44
check 0x40001000 511 0
sync huge-mapped            # 512 mapped, 512 soft-dirty: a new mapping
loop 50
  check 0x40000000 1 0x44
  yield
end
sync huge-read              # 0
fill 0x40100000 1 0x45
check 0x40000000 1 0x44
sync huge-written           # 512: one 4 KiB write dirties the whole 2 MiB page
exit 0
