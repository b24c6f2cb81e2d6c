"""verify's scratch buffers: consecutive tasks never share memory, a task's views stay valid
when its buffer grows, and steady state allocates nothing."""
import torch

from ckptconv.verify.pieces import Scratch


def _ptrs(t):
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_consecutive_tasks_do_not_overlap_and_buffers_are_reused():
    s = Scratch()
    seen = []
    for task in range(6):
        s.next_task()
        views = [s.take((5, 7), torch.bfloat16), s.take((3,), torch.float32), s.take((), torch.int64)]
        for v in views:
            assert v.data_ptr() % Scratch.ALIGN == 0 and v.is_contiguous()
            v.fill_(task)
        seen.append(views)
        if task:
            prev = [_ptrs(v) for v in seen[-2]]
            cur = [_ptrs(v) for v in views]
            assert all(b1 <= a2 or b2 <= a1 for a1, b1 in prev for a2, b2 in cur)   # disjoint
            assert all(bool((v == task - 1).all()) for v in seen[-2])              # not overwritten
    assert seen[5][0].data_ptr() == seen[3][0].data_ptr()                          # steady state: same memory


def test_growth_keeps_earlier_views_of_the_task():
    s = Scratch()
    s.next_task()
    small = s.take((4,), torch.float32).fill_(1.0)
    big = s.take((1 << 16,), torch.float32).fill_(2.0)
    assert bool((small == 1.0).all()) and bool((big == 2.0).all())
