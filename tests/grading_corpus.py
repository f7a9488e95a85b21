r"""Labelled corpus for the answer checker (:mod:`m1.eval.grading`), issue #18.

Every case is ``Case(category, output, gold, expected, hard=False, note="")``:

* ``output``: a (short) model completion, as the checker receives it;
* ``gold``: the reference answer, as a benchmark stores it;
* ``expected``: what a careful human grader says -- is ``output``'s final
  answer mathematically the gold answer?  Not whatever m1 returns today.
  Where m1's documented policy (module docstring of ``m1/eval/grading.py``)
  deliberately decides a debatable point, the case follows the policy and
  its ``note`` says so;
* ``hard``: an expected-False case where calling it correct would be a plain
  grading bug (wrong number, no answer at all, a lucky last number...): the
  corpus test allows *no* false positive among these.

All cases were written for this project.  Plain data only: the test
(``tests/eval/test_grading_corpus.py``) and the agreement benchmark
(``benchmarks/grading_agreement.py``) do the work.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    category: str
    output: str
    gold: str
    expected: bool
    hard: bool = False
    note: str = ""


POLICY = "m1 policy (see m1/eval/grading.py docstring)"

CASES: list[Case] = [
    # ------------------------------------------------------------ GSM8K style
    Case("gsm8k", "Natalia sold 48 clips in April and 48 / 2 = 24 in May.\nAltogether 48 + 24 = 72.\n#### 72",
         "72", True),
    Case("gsm8k", "She sold 48 + 24 = 72 clips in total. The answer is 72.", "72", True),
    Case("gsm8k", "Each box holds 125 pens, so 10 boxes hold 1,250 pens.\n#### 1,250", "1250", True),
    Case("gsm8k", "The car costs 12 x 1000 = 12000 dollars.\n#### 12000", "12,000", True),
    Case("gsm8k", "He pays 3 * $6 = $18 in total.\n#### $18", "18", True),
    Case("gsm8k", "Snacks cost 3 * 1.50 = 4.50, so she spends $4.50. The answer is $4.50.", "4.5", True),
    Case("gsm8k", "Total time = 3 + 4 = 7 hours. The answer is 7 hours.", "7", True),
    Case("gsm8k", "She has 40 + 2 = 42 stickers.\nA: 42", "42", True),
    Case("gsm8k", "The population grows to 2,400,000 people. The answer is 2,400,000.", "2400000", True),
    Case("gsm8k", "The temperature fell from 5 to 5 - 8 = -3 degrees. The answer is -3.", "-3", True),
    Case("gsm8k", "The answer is 18. Let me double-check: 6 * 3 = 18, correct.", "18", True),
    Case("gsm8k", "It takes 30 + 15 = 45 minutes.\nAnswer: 45 minutes", "45", True),
    Case("gsm8k", "Step 1: 100 + 20 = 120.\n**Answer:** 120", "120", True),
    Case("gsm8k", "She earns 60 / 4 = 15.00 per hour.\n#### 15.00", "15", True),
    Case("gsm8k", "So the total is 1,250.\n#### 1250", "1,250", True),
    Case("gsm8k", "Tom buys 4 packs of 6 cans: 4 * 6 = 24 cans.\nThe answer is 24 cans.", "24", True),
    Case("gsm8k", "48 + 24 = 71 clips in total.\n#### 71", "72", False, hard=True),
    Case("gsm8k", "She has 1,000 + 249 = 1,249 beads. The answer is 1,249.", "1250", False, hard=True),
    Case("gsm8k", "60 * 120 = 7200 seconds.\n#### 7200", "720", False, hard=True),
    Case("gsm8k", "The temperature rose by 18 degrees. The answer is 18.", "-18", False, hard=True),
    Case("gsm8k", "He pays $18 for 3 tickets, so each ticket costs 18 / 3 = $6.\n#### 6", "18", False, hard=True),
    Case("gsm8k", "Half of 250 is 125.\nA: 125", "250", False, hard=True),

    # ------------------------------------------------------------ MATH: plain numbers in a box
    Case("boxed_number", r"Adding them, we get $\boxed{42}$.", "42", True),
    Case("boxed_number", r"The sum is \boxed{ 17 }.", "17", True),
    Case("boxed_number", r"So $n = \boxed{-7}$.", "-7", True),
    Case("boxed_number", r"The answer, as three digits, is \boxed{043}.", "43", True),
    Case("boxed_number", r"\boxed{27.0}", "27", True),
    Case("boxed_number", r"There are \boxed{10{,}000} such strings.", "10000", True),
    Case("boxed_number", r"There are \boxed{10,\!000} such strings.", "10{,}000", True),
    Case("boxed_number", r"\boxed{1\,000\,000}", "1000000", True),
    Case("boxed_number", r"So the count is $2^{10} = \boxed{1024}$.", "1024", True),
    Case("boxed_number", r"The number of subsets is \boxed{2^{10}}.", "1024", True),
    Case("boxed_number", r"\boxed{10^3}", "1000", True),
    Case("boxed_number", r"\boxed{34}", "43", False, hard=True),
    Case("boxed_number", r"\boxed{-7}", "7", False, hard=True),
    Case("boxed_number", r"\boxed{420}", "42", False, hard=True),
    Case("boxed_number", r"There are \boxed{1001} of them.", "1000", False, hard=True),
    Case("boxed_number", r"\boxed{2^{11}}", "1024", False, hard=True),

    # ------------------------------------------------------------ fractions
    Case("fraction", r"\boxed{\frac{3}{4}}", r"\frac34", True),
    Case("fraction", r"The probability is $\boxed{\dfrac{3}{4}}$.", r"\frac{3}{4}", True),
    Case("fraction", r"\boxed{\tfrac{3}{4}}", "0.75", True),
    Case("fraction", r"\boxed{3/4}", r"\frac{3}{4}", True),
    Case("fraction", r"Reducing, \boxed{\frac{6}{8}}.", r"\frac34", True),
    Case("fraction", r"\boxed{-\frac{2}{5}}", r"-\frac25", True),
    Case("fraction", r"\boxed{\frac{-2}{5}}", r"-\frac{2}{5}", True),
    Case("fraction", r"\boxed{0.4}", r"\frac25", True),
    Case("fraction", r"\boxed{\frac{5}{2}}", "2.5", True),
    Case("fraction", r"\boxed{\frac{10}{4}}", r"\dfrac{5}{2}", True),
    Case("fraction", r"\boxed{0.3333333}", r"\frac13", True,
         note="7 decimals: within one unit of the last place of 1/3 (" + POLICY + ")"),
    Case("fraction", r"\boxed{2\frac{1}{4}}", r"\frac94", True,
         note="a mixed number, as MATH writes them"),
    Case("fraction", r"\boxed{\frac{1}{2} + \frac{1}{3}}", r"\frac56", True),
    Case("fraction", r"\boxed{\frac{4}{3}}", r"\frac34", False, hard=True),
    Case("fraction", r"\boxed{\frac{2}{5}}", r"-\frac25", False, hard=True),
    Case("fraction", r"\boxed{0.33}", r"\frac13", False, hard=True,
         note="a 2-decimal rounding is not the exact answer (" + POLICY + ")"),
    Case("fraction", r"\boxed{0.67}", r"\frac{2}{3}", False, hard=True),
    Case("fraction", r"\boxed{\frac{3}{5}}", r"\frac35\pi", False, hard=True),

    # ------------------------------------------------------------ radicals
    Case("radical", r"\boxed{\sqrt{2}}", r"\sqrt2", True),
    Case("radical", r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    Case("radical", r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
    Case("radical", r"\boxed{\sqrt[3]{2}}", r"2^{1/3}", True),
    Case("radical", r"The side is $\boxed{\sqrt[3]2}$.", r"\sqrt[3]{2}", True),
    Case("radical", r"\boxed{5\sqrt{2}}", r"\sqrt{50}", True),
    Case("radical", r"\boxed{\sqrt{8}}", r"2\sqrt2", True),
    Case("radical", r"\boxed{\frac{3\sqrt{5}}{5}}", r"\frac{3}{\sqrt5}", True),
    Case("radical", r"\boxed{4+2\sqrt{3}}", r"2\sqrt3+4", True),
    Case("radical", r"\boxed{\dfrac{\sqrt{6}}{3}}", r"\sqrt{\frac23}", True),
    Case("radical", r"\boxed{\sqrt{3}}", r"\sqrt[3]{3}", False, hard=True),
    Case("radical", r"\boxed{3\sqrt{2}}", r"2\sqrt{3}", False, hard=True),
    Case("radical", r"\boxed{1.41}", r"\sqrt2", False, hard=True),
    Case("radical", r"\boxed{\sqrt{2}+1}", r"\sqrt2-1", False, hard=True),
    Case("radical", r"\boxed{\sqrt{5}}", "5", False, hard=True),

    # ------------------------------------------------------------ pi
    Case("pi", r"The area is \boxed{4\pi}.", r"4\pi", True),
    Case("pi", r"\boxed{\pi \cdot 4}", r"4\pi", True),
    Case("pi", r"\boxed{\frac{\pi}{3}}", r"\frac13\pi", True),
    Case("pi", r"\boxed{\frac{3\pi}{4}}", r"\frac{3}{4}\pi", True),
    Case("pi", r"\boxed{36 \pi}", r"36\pi", True),
    Case("pi", r"The volume is $\boxed{8\pi \text{ cm}^3}$.", r"8\pi", True),
    Case("pi", r"\boxed{2\pi - 4}", r"-4+2\pi", True),
    Case("pi", r"\boxed{12.56}", r"4\pi", False, hard=True),
    Case("pi", r"\boxed{2\pi}", r"\pi", False, hard=True),
    Case("pi", r"\boxed{\frac{\pi}{4}}", r"\frac{\pi}{3}", False, hard=True),
    Case("pi", r"\boxed{16}", r"16\pi", False, hard=True),

    # ------------------------------------------------------------ intervals
    Case("interval", r"\boxed{(-\infty, 3)}", r"(-\infty,3)", True),
    Case("interval", r"The domain is $\boxed{[2, 5)}$.", "[2,5)", True),
    Case("interval", r"\boxed{(-\infty,-1)\cup(1,\infty)}", r"(-\infty,-1)\cup(1,\infty)", True),
    Case("interval", r"\boxed{(1,\infty)\cup(-\infty,-1)}", r"(-\infty,-1)\cup(1,\infty)", True),
    Case("interval", r"\boxed{[0,1]}", "[0,1]", True),
    Case("interval", r"\boxed{\left[0, \frac{1}{2}\right]}", "[0,0.5]", True),
    Case("interval", r"\boxed{\left[ -1, 4 \right]}", "[-1,4]", True),
    Case("interval", r"\boxed{(2,5)}", "[2,5)", False, hard=True),
    Case("interval", r"\boxed{(-\infty, 3]}", r"(-\infty, 3)", False, hard=True),
    Case("interval", r"\boxed{(-2,2)}", "(-2,3)", False, hard=True),
    Case("interval", r"\boxed{(-\infty,-1)}", r"(-\infty,-1)\cup(1,\infty)", False, hard=True),
    Case("interval", r"\boxed{3}", "[1,5]", False, hard=True,
         note="a number inside the interval is not the interval"),

    # ------------------------------------------------------------ tuples / points
    Case("tuple", r"The point is \boxed{(3, 4)}.", "(3,4)", True),
    Case("tuple", r"\boxed{(1,2,3)}", "(1,2,3)", True),
    Case("tuple", r"\boxed{\left(\frac{1}{2}, -3\right)}", r"(\frac12,-3)", True),
    Case("tuple", r"\boxed{(0.5, -3)}", r"\left(\frac{1}{2},-3\right)", True),
    Case("tuple", r"\boxed{\left(2, \frac{\pi}{4}\right)}", r"(2,\frac{\pi}{4})", True),
    Case("tuple", r"\boxed{(2\sqrt2, \frac{\pi}{4})}", r"(\sqrt8,\frac\pi4)", True),
    Case("tuple", r"\boxed{3, 4}", "(3,4)", True,
         note="a bare list for an ordered pair, in order (" + POLICY + ")"),
    Case("tuple", r"\boxed{(4, 3)}", "(3,4)", False, hard=True, note="ordered pair, wrong order"),
    Case("tuple", r"\boxed{(1,2)}", "(1,2,3)", False, hard=True),
    Case("tuple", r"\boxed{(1,2,3,4)}", "(1,2,3)", False, hard=True),
    Case("tuple", r"\boxed{(3,-2,1)}", "(3,-2,-1)", False, hard=True),
    Case("tuple", r"\boxed{4, 3}", "(3,4)", False, hard=True),
    Case("tuple", r"\boxed{\{3,4\}}", "(3,4)", False,
         note="a set is not an ordered pair (" + POLICY + "; math-verify says True)"),

    # ------------------------------------------------------------ sets / unordered lists
    Case("set", r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", True),
    Case("set", r"The solutions are $\boxed{1, 2, 3}$.", r"\{1,2,3\}", True),
    Case("set", r"\boxed{-2, 3}", "3, -2", True),
    Case("set", r"\boxed{1,-1}", "-1,1", True),
    Case("set", r"\boxed{\frac12, 3}", "3, 0.5", True),
    Case("set", r"\boxed{\left\{ -\frac{1}{2}, 4 \right\}}", r"\{4,-\frac12\}", True),
    Case("set", r"\boxed{\{1,2\}}", r"\{1,2,3\}", False, hard=True),
    Case("set", r"\boxed{2, 3}", "2,3,4", False, hard=True),
    Case("set", r"\boxed{2, 3, 4, 5}", "2,3,4", False, hard=True),
    Case("set", r"\boxed{3}", r"\{3,4\}", False, hard=True),
    Case("set", r"\boxed{-1, 2}", "1,2", False, hard=True),

    # ------------------------------------------------------------ matrices / vectors
    Case("matrix", r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}",
         r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    Case("matrix", r"\boxed{\begin{pmatrix} 2 \\ -1 \end{pmatrix}}", r"\begin{pmatrix}2\\-1\end{pmatrix}", True),
    Case("matrix", r"\boxed{\begin{pmatrix} \frac{1}{2} \\ 0 \end{pmatrix}}",
         r"\begin{pmatrix} 1/2 \\ 0 \end{pmatrix}", True),
    Case("matrix", r"\boxed{\begin{bmatrix} 1 & 0 \\ 0 & 1 \end{bmatrix}}",
         r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", True),
    Case("matrix", r"\boxed{\begin{pmatrix} 2 & 4 \\ 6 & 8 \end{pmatrix}}",
         r"\begin{pmatrix}2&4\\6&8\end{pmatrix}", True),
    Case("matrix", r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}}",
         r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False, hard=True),
    Case("matrix", r"\boxed{\begin{pmatrix} -1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}2\\-1\end{pmatrix}", False,
         hard=True),
    Case("matrix", r"\boxed{\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}}",
         r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False, hard=True, note="the transpose"),
    Case("matrix", r"\boxed{\begin{pmatrix} 2 \\ -1 \\ 0 \end{pmatrix}}", r"\begin{pmatrix}2\\-1\end{pmatrix}",
         False, hard=True),

    # ------------------------------------------------------------ degrees
    Case("degree", r"The angle is $\boxed{30^\circ}$.", "30", True),
    Case("degree", r"\boxed{30}", r"30^\circ", True),
    Case("degree", r"\boxed{30^{\circ}}", r"30^\circ", True),
    Case("degree", r"\boxed{30°}", "30", True),
    Case("degree", r"\boxed{45 \text{ degrees}}", "45", True),
    Case("degree", r"\boxed{120\degree}", "120", True),
    Case("degree", r"\boxed{60^\circ}", "30", False, hard=True),
    Case("degree", r"\boxed{150^\circ}", r"30^\circ", False, hard=True),

    # ------------------------------------------------------------ units in text
    Case("unit", r"The side is \boxed{5 \text{ cm}}.", "5", True),
    Case("unit", r"\boxed{12\text{ inches}}", "12", True),
    Case("unit", r"\boxed{15\mbox{ cm}^2}", "15", True),
    Case("unit", r"\boxed{\$ 4.50}", "4.50", True),
    Case("unit", r"\boxed{4.5 \text{ dollars}}", r"\$4.50", True),
    Case("unit", r"\boxed{3\text{ hours}}", "3", True),
    Case("unit", r"\boxed{20 \mathrm{~m/s}}", "20", True),
    Case("unit", r"\boxed{18 \text{ square units}}", r"18\text{ square units}", True),
    Case("unit", r"\boxed{7 \text{ meters}}", "8", False, hard=True),
    Case("unit", r"\boxed{\$ 4.05}", "4.50", False, hard=True),

    # ------------------------------------------------------------ percent
    Case("percent", r"\boxed{25\%}", "25", True),
    Case("percent", r"\boxed{25}", r"25\%", True),
    Case("percent", r"The discount is \boxed{12.5\%}.", "12.5", True),
    Case("percent", r"\boxed{25 \text{ percent}}", "25", True),
    Case("percent", r"\boxed{60\%}", r"60\%", True),
    Case("percent", r"\boxed{0.25}", r"25\%", False,
         note="a fraction for a 'what percent' answer (" + POLICY + "; math-verify may say True)"),
    Case("percent", r"\boxed{40\%}", r"45\%", False, hard=True),
    Case("percent", r"\boxed{75\%}", "25", False, hard=True),

    # ------------------------------------------------------------ word answers
    Case("text", r"The meeting falls on \boxed{\text{Tuesday}}.", r"\text{Tuesday}", True),
    Case("text", r"\boxed{tuesday}", r"\text{Tuesday}", True),
    Case("text", r"\boxed{\text{even}}", r"\text{even}", True),
    Case("text", r"\boxed{\text{Evelyn}}", "Evelyn", True),
    Case("text", r"\boxed{\text{Wednesday}}", r"\text{Tuesday}", False, hard=True),
    Case("text", r"\boxed{\text{odd}}", r"\text{even}", False, hard=True),
    Case("text", r"\boxed{\text{neither}}", r"\text{odd}", False, hard=True),

    # ------------------------------------------------------------ the Minerva ending
    Case("minerva", "We add the parts: 60 + 40 = 100.\nFinal Answer: The final answer is $100$. I hope it is correct.",
         "100", True),
    Case("minerva", r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.", "0.75", True),
    Case("minerva", r"Final Answer: The final answer is $(2,3)$. I hope it is correct.", "(2,3)", True),
    Case("minerva", "Final Answer: The final answer is 12. I hope it is correct.", "12", True),
    Case("minerva", r"Final Answer: The final answer is $x^2+1$. I hope it is correct.", "1+x^2", True),
    Case("minerva", r"Final Answer: The final answer is $\text{(B)}$. I hope it is correct.", r"\text{(B)}", True),
    Case("minerva", "First attempt: $\\boxed{5}$ is too small.\n"
         "Final Answer: The final answer is $6$. I hope it is correct.", "6", True),
    Case("minerva", "First attempt: $\\boxed{5}$ is too small.\n"
         "Final Answer: The final answer is $6$. I hope it is correct.", "5", False, hard=True),
    Case("minerva", "Final Answer: The final answer is $101$. I hope it is correct.", "100", False, hard=True),
    Case("minerva", r"Final Answer: The final answer is $\frac{4}{3}$. I hope it is correct.", "0.75", False,
         hard=True),
    Case("minerva", r"Final Answer: The final answer is $(3,2)$. I hope it is correct.", "(2,3)", False, hard=True),

    # ------------------------------------------------------------ answers without a box
    Case("unboxed", "Putting it together:\nAnswer \\[ 9 \\]", "9", True),
    Case("unboxed", "Putting it together:\nAnswer $ 9 $", "9", True),
    Case("unboxed", r"Therefore $x \geq 5$ is the solution.", r"[5,\infty)", True),
    Case("unboxed", r"Therefore $x \geq 5$ is the solution.", r"x \ge 5", True),
    Case("unboxed", r"The solution is \[ x = \frac{1}{2}. \]", r"\frac12", True),
    Case("unboxed", r"Solving the linear equation gives $x=7$.", "7", True),
    Case("unboxed", r"So the area of the triangle is $24$.", "24", True),
    Case("unboxed", r"Hence the answer \(\frac{5}{2}\).", "2.5", True),
    Case("unboxed", r"Thus $a+b = 11$.", "11", True),
    Case("unboxed", "Putting it together:\nAnswer \\[ 9 \\]", "8", False, hard=True),
    Case("unboxed", r"Therefore $x \geq 5$ is the solution.", r"(5,\infty)", False, hard=True),
    Case("unboxed", r"Solving the linear equation gives $x=7$.", "-7", False, hard=True),

    # ------------------------------------------------------------ several boxes that together are the answer
    Case("multi_box", r"The pairs are \boxed{(2,2)} \quad\text{and}\quad \boxed{(6,2)}.", "(2,2),(6,2)", True),
    Case("multi_box", r"The pairs are \boxed{(2,2)} \quad\text{and}\quad \boxed{(6,2)}.", "(6,2),(2,2)", True),
    Case("multi_box", r"The roots are \boxed{2} and \boxed{3}.", "2,3", True),
    Case("multi_box", r"\boxed{2}, \boxed{3}", "3, 2", True),
    Case("multi_box", r"$x = \boxed{-1}$ or $x = \boxed{4}$", "4,-1", True),
    Case("multi_box", r"\boxed{1}, \boxed{2}, \boxed{3}", r"\{1,2,3\}", True),
    Case("multi_box", r"First, \boxed{3} is the number of red balls. The total is \boxed{10}.", "10", True),
    Case("multi_box", r"The pairs are \boxed{(2,2)} \quad\text{and}\quad \boxed{(6,2)}.", "(2,2)", False,
         hard=True, note="only half the answer"),
    Case("multi_box", r"The roots are \boxed{2} and \boxed{3}.", "2", False, hard=True),
    Case("multi_box", r"The roots are \boxed{2} and \boxed{5}.", "2,3", False, hard=True),
    Case("multi_box", r"First, \boxed{3} is the number of red balls. The total is \boxed{10}.", "3", False,
         hard=True),

    # ------------------------------------------------------------ an early box, then a final answer
    Case("box_then_final", r"We first get \boxed{12}, but this double counts. The final answer is 6.", "6", True),
    Case("box_then_final", r"We first get \boxed{12}, but this double counts. The final answer is 6.", "12", False,
         hard=True),
    Case("box_then_final", r"Initially \boxed{5}. Correcting the slip, the final answer is $\frac{5}{2}$.",
         r"\frac52", True),
    Case("box_then_final", r"Initially \boxed{5}. Correcting the slip, the final answer is $\frac{5}{2}$.",
         "5", False, hard=True),
    Case("box_then_final", r"I computed \boxed{4}. Wait, that is wrong; recomputing, the final answer is 5.",
         "5", True),
    Case("box_then_final", r"The final answer is 3. Actually, checking again: \boxed{4}.", "4", True),
    Case("box_then_final", r"The final answer is 3. Actually, checking again: \boxed{4}.", "3", False, hard=True),
    Case("box_then_final", r"The final answer is \boxed{9}.", "9", True),
    Case("box_then_final", "A first guess is \\boxed{7}.\nAfter fixing the sign error:\nFinal answer: 8", "8", True),
    Case("box_then_final", "A first guess is \\boxed{7}.\nAfter fixing the sign error:\nFinal answer: 8", "7", False,
         hard=True),

    # ------------------------------------------------------------ assignments
    Case("assignment", r"\boxed{(p,q)=(3,2)}", "(3,2)", True),
    Case("assignment", r"\boxed{(p,q)=(2,3)}", "(3,2)", False, hard=True),
    Case("assignment", r"\boxed{x=3, y=2}", "(3,2)", True),
    Case("assignment", r"\boxed{y=2, x=3}", "(3,2)", True),
    Case("assignment", r"\boxed{x=2, y=3}", "(3,2)", False, hard=True),
    Case("assignment", r"\boxed{x = 5}", "5", True),
    Case("assignment", r"So $\boxed{a=4}$.", "4", True),
    Case("assignment", r"\boxed{x=2, x=3}", "2,3", True),
    Case("assignment", r"\boxed{x=2 \text{ or } x=3}", "3,2", True),
    Case("assignment", r"\boxed{k = -1}", "-1", True),
    Case("assignment", r"\boxed{(a,b,c)=(1,2,3)}", "(1,2,3)", True),
    Case("assignment", r"\boxed{n=6}", "7", False, hard=True),
    Case("assignment", r"\boxed{x=2, x=3}", "2", False, hard=True),

    # ------------------------------------------------------------ "6 and 8" lists
    Case("and_list", r"\boxed{6 \text{ and } 8}", "6,8", True),
    Case("and_list", r"\boxed{6 and 8}", "6, 8", True),
    Case("and_list", r"\boxed{8 \text{ and } 6}", "6,8", True),
    Case("and_list", r"The two numbers are $6$ and $8$.", "6,8", True),
    Case("and_list", r"\boxed{6, 8, \text{ and } 10}", "6,8,10", True),
    Case("and_list", r"\boxed{-3 \text{ or } 3}", "3,-3", True),
    Case("and_list", r"\boxed{6 \text{ and } 9}", "6,8", False, hard=True),
    Case("and_list", r"\boxed{6 \text{ and } 8}", "6", False, hard=True),
    Case("and_list", r"The two numbers are $6$ and $8$.", "6,8,10", False, hard=True),

    # ------------------------------------------------------------ inequalities vs intervals
    Case("inequality", r"\boxed{0<f(x)<1}", "(0,1)", True),
    Case("inequality", r"\boxed{0 \le x \le 1}", "[0,1]", True),
    Case("inequality", r"\boxed{x > 2}", r"(2,\infty)", True),
    Case("inequality", r"\boxed{x < -1}", r"(-\infty,-1)", True),
    Case("inequality", r"\boxed{-2 < x < 3}", "(-2,3)", True),
    Case("inequality", r"\boxed{3 > x > -2}", "(-2,3)", True),
    Case("inequality", r"\boxed{5 \le x}", r"[5,\infty)", True),
    Case("inequality", r"\boxed{x \geq 2}", r"(2,\infty)", False, hard=True),
    Case("inequality", r"\boxed{-2 < x < 3}", "[-2,3]", False, hard=True),
    Case("inequality", r"\boxed{0<f(x)<1}", "[0,1)", False, hard=True),
    Case("inequality", r"\boxed{x > 2}", r"(-\infty,2)", False, hard=True),

    # ------------------------------------------------------------ decimal commas
    Case("decimal_comma", r"\boxed{1,5}", "1.5", True),
    Case("decimal_comma", r"\boxed{0,25}", r"\frac14", True),
    Case("decimal_comma", r"\boxed{3,75}", "3.75", True),
    Case("decimal_comma", "The answer is 12,5.", "12.5", True),
    Case("decimal_comma", r"\boxed{1{,}5}", "1.5", True),
    Case("decimal_comma", r"\boxed{2,5}", "2.6", False, hard=True),
    Case("decimal_comma", r"\boxed{1,5}", "15", False, hard=True),
    Case("decimal_comma", r"\boxed{0,75}", "0.57", False, hard=True),

    # ------------------------------------------------------------ doubled backslashes (JSON-escaped LaTeX)
    Case("doubled_backslash", r"\\boxed{\\frac{1}{2}}", r"\frac12", True),
    Case("doubled_backslash", r"So \\boxed{\\dfrac{3}{4}}.", "0.75", True),
    Case("doubled_backslash", r"\\boxed{\\sqrt{2}}", r"\sqrt2", True),
    Case("doubled_backslash", r"\\boxed{2\\pi}", r"2\pi", True),
    Case("doubled_backslash", r"The answer is $\\frac{5}{6}$.", r"\frac56", True),
    Case("doubled_backslash", r"\\boxed{\\left(1, \\frac{\\pi}{2}\\right)}", r"(1,\frac\pi2)", True),
    Case("doubled_backslash", r"\boxed{\frac{1}{2}}", r"\\frac{1}{2}", True),
    Case("doubled_backslash", r"\\boxed{\\frac{1}{3}}", r"\frac12", False, hard=True),
    Case("doubled_backslash", r"\\boxed{\\sqrt{3}}", r"\sqrt2", False, hard=True),

    # ------------------------------------------------------------ multiple choice
    Case("multiple_choice", r"\boxed{C}", "(C)", True),
    Case("multiple_choice", r"\boxed{(C)}", r"\text{(C)}", True),
    Case("multiple_choice", r"\boxed{\textbf{(C)}}", "(C)", True),
    Case("multiple_choice", r"\boxed{\text{C}}", "(C)", True),
    Case("multiple_choice", "Comparing the options, the answer is (B).", "(B)", True),
    Case("multiple_choice", r"\boxed{c}", "(C)", True),
    Case("multiple_choice", "Answer: D", "(D)", True),
    Case("multiple_choice", r"The correct option is \boxed{A}.", r"\text{(A)}", True),
    Case("multiple_choice", r"\boxed{\textbf{(E)}\ 12}", "(E)", True,
         note="AMC style: the letter with the option's value"),
    Case("multiple_choice", r"\boxed{B}", "(C)", False, hard=True),
    Case("multiple_choice", r"\boxed{12}", "(E)", False, hard=True, note="a value instead of a letter"),
    Case("multiple_choice", "Comparing the options, the answer is (A).", "(B)", False, hard=True),
    Case("multiple_choice", r"\boxed{\textbf{(D)}}", r"\text{(E)}", False, hard=True),

    # ------------------------------------------------------------ symbolic expressions
    Case("symbolic", r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    Case("symbolic", r"\boxed{2x+2}", "2(x+1)", True),
    Case("symbolic", r"\boxed{x^2-1}", "(x-1)(x+1)", True),
    Case("symbolic", r"\boxed{3n+3}", "3(n+1)", True),
    Case("symbolic", r"\boxed{e^{2x}}", "(e^x)^2", True),
    Case("symbolic", r"\boxed{\log_2 8}", "3", True),
    Case("symbolic", r"\boxed{y=2x+1}", "y=2x+1", True),
    Case("symbolic", r"\boxed{2+3i}", "3i+2", True),
    Case("symbolic", r"\boxed{\binom{5}{2}}", "10", True),
    Case("symbolic", r"\boxed{\frac{a+b}{2}}", r"\frac{a}{2}+\frac{b}{2}", True),
    Case("symbolic", r"\boxed{x^2+1}", "(x+1)^2", False, hard=True),
    Case("symbolic", r"\boxed{\frac{x+1}{x-1}}", r"\frac{x-1}{x+1}", False, hard=True),
    Case("symbolic", r"\boxed{y = -2x + 1}", "y=2x+1", False, hard=True),
    Case("symbolic", r"\boxed{2-3i}", "2+3i", False, hard=True),
    Case("symbolic", r"\boxed{3n}", "3(n+1)", False, hard=True),

    # ------------------------------------------------------------ no answer: empty, prose, truncated
    Case("no_answer", "", "5", False, hard=True),
    Case("no_answer", "   \n  ", "5", False, hard=True),
    Case("no_answer", "I am not sure how to solve this problem.", "5", False, hard=True),
    Case("no_answer", "Let me think step by step.", "1", False, hard=True),
    Case("no_answer", r"The answer is \boxed{1", "1", False, hard=True,
         note="truncated inside the box: it might have been 12"),
    Case("no_answer", r"\boxed{}", "0", False, hard=True),
    Case("no_answer", "The answer is", "5", False, hard=True),
    Case("no_answer", "To find the total we multiply the number of rows by", "12", False, hard=True),
    Case("no_answer", "Let x be the number of apples. Then we have to solve the equation where", "7", False,
         hard=True),
    Case("no_answer", r"We need $\frac{", r"\frac12", False, hard=True),

    # ------------------------------------------------------------ traps for a last-number fallback
    Case("last_number_trap", "So far we have 3 + 15 = 18 eggs and then", "18", False, hard=True,
         note="truncated: the last number is a partial result"),
    Case("last_number_trap", "The answer is 5.\nCheck: there were 18 eggs in the basket originally.", "18", False,
         hard=True),
    Case("last_number_trap", r"I think the answer is \boxed{12}. There were 18 eggs in total.", "18", False,
         hard=True),
    Case("last_number_trap", "#### 16\nNote: each carton holds 18 eggs.", "18", False, hard=True),
    Case("last_number_trap", "Let me compute 6 * 3 = 18. Hmm, I need to reconsider the", "18", False, hard=True),
    Case("last_number_trap",
         r"We get \boxed{18}, wait, I need to subtract the 3 broken ones: 18 - 3 = 15, so \boxed{15}.", "18", False,
         hard=True),
    Case("last_number_trap", "There are 4 cases, each with 25 options, 100 in all, but", "100", False, hard=True),
    Case("last_number_trap", "Problem 7: compute the sum of the first 7 positive integers.", "7", False, hard=True),
    Case("last_number_trap", "A: 20\nThat was for 2 people; for 3 people it would be 30.", "30", False, hard=True),
]

# ---------------------------------------------------------------- more variety
# A second block of cases in the same categories: other phrasings, other
# numbers, the same traps dressed differently.
CASES += [
    Case("gsm8k", "Mary had 5 apples and bought 3 more, 5 + 3 = 8.\n#### 8", "8", True),
    Case("gsm8k", "The shop earns $1,500 a day, so 7 days bring $10,500.\n#### 10,500", "10500", True),
    Case("gsm8k", "Each ticket is $12.50 and he buys 4, so 4 * 12.50 = 50.\nThe answer is 50.", "50", True),
    Case("gsm8k", "The tank holds 40 liters; 3/4 of it is 30 liters.\nThe answer is 30 liters.", "30", True),
    Case("gsm8k", "They drove 60 * 2.5 = 150 miles.\n#### 150 miles", "150", True),
    Case("gsm8k", "The answer is 0.5.", "0.50", True),
    Case("gsm8k", "The garden is 12 * 8 = 96 square feet. The answer is 96.", "97", False, hard=True),
    Case("gsm8k", "Mary had 5 apples and bought 3 more, 5 + 3 = 8.\n#### 8", "15", False, hard=True),

    Case("boxed_number", r"Thus $m+n = \boxed{503}$.", "503", True),
    Case("boxed_number", r"\boxed{\mathbf{12}}", "12", True),
    Case("boxed_number", r"\boxed{+5}", "5", True),
    Case("boxed_number", r"\boxed{1.50}", "1.5", True),
    Case("boxed_number", r"\boxed{503}", "530", False, hard=True),
    Case("boxed_number", r"\boxed{0.15}", "1.5", False, hard=True),

    Case("fraction", r"So the ratio is $\boxed{\frac{7}{12}}$.", r"\dfrac{7}{12}", True),
    Case("fraction", r"\boxed{\frac{14}{24}}", r"\frac{7}{12}", True),
    Case("fraction", r"\boxed{\frac{12}{7}}", r"\frac{7}{12}", False, hard=True),
    Case("fraction", r"\boxed{\frac{7}{13}}", r"\frac{7}{12}", False, hard=True),

    Case("radical", r"\boxed{\sqrt{18}}", r"3\sqrt{2}", True),
    Case("radical", r"\boxed{\frac{1}{2}\sqrt{3}}", r"\frac{\sqrt3}{2}", True),
    Case("radical", r"\boxed{\sqrt{17}}", r"\sqrt{19}", False, hard=True),

    Case("pi", r"\boxed{\frac{25\pi}{2}}", r"12.5\pi", True),
    Case("pi", r"\boxed{100\pi}", r"100\pi \text{ square feet}", True),
    Case("pi", r"\boxed{50\pi}", r"100\pi", False, hard=True),

    Case("interval", r"\boxed{[-3, \infty)}", r"[-3,\infty)", True),
    Case("interval", r"\boxed{(-3, \infty)}", r"[-3,\infty)", False, hard=True),

    Case("tuple", r"\boxed{(-1, 0)}", "(-1,0)", True),
    Case("tuple", r"\boxed{(0, -1)}", "(-1,0)", False, hard=True),

    Case("set", r"\boxed{\{5, -5\}}", r"\{-5,5\}", True),
    Case("set", r"\boxed{\{5\}}", r"\{-5,5\}", False, hard=True),

    Case("degree", r"\boxed{72^\circ}", r"72", True),
    Case("degree", r"\boxed{27^\circ}", r"72^\circ", False, hard=True),

    Case("unit", r"\boxed{9 \text{ ft}^2}", "9", True),
    Case("unit", r"\boxed{90 \text{ cents}}", "9", False, hard=True),

    Case("percent", r"\boxed{8\%}", "8", True),
    Case("percent", r"\boxed{80\%}", r"8\%", False, hard=True),

    Case("text", r"\boxed{\text{Bob}}", r"\text{Bob}", True),
    Case("text", r"\boxed{\text{Alice}}", r"\text{Bob}", False, hard=True),

    Case("minerva", r"Final Answer: The final answer is $\sqrt{2}$. I hope it is correct.", r"\frac{2}{\sqrt2}",
         True),
    Case("minerva", r"Final Answer: The final answer is $[1,4)$. I hope it is correct.", "[1,4)", True),

    Case("unboxed", r"The final value is therefore $\frac{7}{2}$.", "3.5", True),
    Case("unboxed", r"The final value is therefore $\frac{7}{2}$.", "7", False, hard=True),

    Case("multi_box", r"$a = \boxed{3}$ and $b = \boxed{4}$", "3,4", True),

    Case("box_then_final", r"Hence \boxed{16}. Hmm, the problem asks for half, so the final answer is $8$.",
         "8", True),

    Case("assignment", r"\boxed{(x,y)=(-1,4)}", "(-1,4)", True),
    Case("assignment", r"\boxed{(x,y)=(4,-1)}", "(-1,4)", False, hard=True),

    Case("and_list", r"\boxed{2 \text{ and } 7}", "2, 7", True),
    Case("and_list", r"\boxed{2 \text{ and } 7}", "2, 7, 9", False, hard=True),

    Case("inequality", r"\boxed{1 \le x < 4}", "[1,4)", True),
    Case("inequality", r"\boxed{1 < x \le 4}", "[1,4)", False, hard=True),

    Case("decimal_comma", r"\boxed{2,75}", "2.75", True),

    Case("doubled_backslash", r"\\boxed{\\frac{\\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),

    Case("multiple_choice", r"\boxed{\textbf{(B)}}", r"\text{(B)}", True),
    Case("multiple_choice", r"\boxed{E}", "(B)", False, hard=True),

    Case("symbolic", r"\boxed{\frac{1}{x}+\frac{1}{y}}", r"\frac{x+y}{xy}", True),
    Case("symbolic", r"\boxed{\frac{1}{x+y}}", r"\frac{1}{x}+\frac{1}{y}", False, hard=True),

    Case("pi", r"\boxed{\frac{\pi}{2}}", r"\frac\pi2", True, note="a gold with unbraced arguments"),
    Case("pi", r"\boxed{\frac\pi{6}}", r"\frac{\pi}{6}", True),
    Case("pi", r"\boxed{\frac{\pi}{6}}", r"\frac\pi3", False, hard=True),
    Case("box_then_final", "Draft: \\boxed{10}.\n**Final Answer:** 12. This is consistent with the check.", "12",
         True),
    Case("multi_box", r"So $x=\boxed{2}$ or $x=\boxed{3}$.", "2", False, hard=True),

    Case("no_answer", "Hmm.", "3", False, hard=True),
    Case("no_answer", r"The final answer is \boxed{\frac{1}{", r"\frac12", False, hard=True,
         note="truncated inside the box"),
    Case("no_answer", r"\boxed{\text{not enough information}}", "5", False, hard=True),

    # harder cases: hedging, equations, unions, near misses
    Case("gsm8k", "The answer is 5 or 6.", "5", False, hard=True, note="hedging between two values"),
    Case("gsm8k", "The answer is not 5. It is 6.", "5", False, hard=True),
    Case("gsm8k", "The answer is not 5. It is 6.", "6", True),
    Case("gsm8k", "The answer is 5, not 6.", "6", False, hard=True),
    Case("gsm8k", "The answer is 5, not 6.", "5", True),
    Case("gsm8k", "#### 18.5", "18", False, hard=True),
    Case("gsm8k", "Adding the three bags gives 12 + 15 + 15 = 42.\nSo the total is **42** apples.", "42", True,
         note="a clear final statement with no answer marker"),
    Case("boxed_number", r"\boxed{0.999999}", "1", False, hard=True),
    Case("boxed_number", r"\boxed{2,500}", "2500", True),
    Case("boxed_number", r"\boxed{1 000}", "1000", True),
    Case("boxed_number", r"\boxed{0.000001}", "10^{-6}", True),
    Case("pi", r"\boxed{3.1416}", r"\pi", False, hard=True),
    Case("pi", r"\boxed{\frac{22}{7}}", r"\pi", False, hard=True),
    Case("degree", r"\boxed{\frac{\pi}{2}}", r"90^\circ", False,
         note="no degree/radian conversion (" + POLICY + ")"),
    Case("set", r"\boxed{\{4\}}", "4", True, note="a one-element solution set"),
    Case("set", r"\boxed{\pm 3}", "3,-3", True),
    Case("set", r"\boxed{\{ 1, 2 \}}", r"\{1,2\}", True),
    Case("set", r"\boxed{1 \pm \sqrt{2}}", r"1+\sqrt2, 1-\sqrt2", True),
    Case("set", r"\boxed{3}", r"\pm 3", False, hard=True, note="half of the answer"),
    Case("interval", r"\boxed{x \in [2,5)}", "[2,5)", True),
    Case("interval", r"\boxed{(1,2) \cup (3,4)}", r"(1,2)\cup(3,4)", True),
    Case("inequality", r"\boxed{x<-1 \text{ or } x>1}", r"(-\infty,-1)\cup(1,\infty)", True),
    Case("tuple", r"\boxed{(3,\, 4)}", "(3,4)", True),
    Case("symbolic", r"\boxed{y = 3x - 2}", "3x-2", True),
    Case("symbolic", r"\boxed{f(x) = x^2 + 1}", "x^2+1", True),
    Case("symbolic", r"\boxed{2x - y = 4}", "y=2x-4", True, note="the same line, rearranged"),
    Case("symbolic", r"\boxed{-i}", "i", False, hard=True),
    Case("symbolic", r"\boxed{2.718}", "e", False, hard=True),
    Case("symbolic", r"\boxed{\infty}", r"-\infty", False, hard=True),
    Case("assignment", r"\boxed{a_1 = 3}", "3", True),
    Case("multiple_choice", r"The answer is (C) 12.", "(C)", True),
    Case("doubled_backslash", r"\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
         r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    Case("unboxed", r"The perimeter is $2\pi r$ with $r = 3$, that is $6\pi$.", r"6\pi", True),
    Case("last_number_trap", r"We know $a = 5$ and we still need b. Since", "5", False,
         note="truncated: the last formula is a given, not an answer (m1's last-environment rule, "
              "step 2b, takes it, as math-verify does)"),
    Case("last_number_trap", "We want the 3rd term of the sequence 1, 2, 3, 4, and so", "4", False, hard=True),
]

# ---------------------------------------------------------------- spaces between numbers, ASCII relations
# (2026-12-06, after the fresh public set of benchmarks/data/grading_public.jsonl showed them; cases
# of our own writing in the same categories)
CASES += [
    # a mixed number is a whole number and a proper fraction, never the digits run together
    Case("mixed_number", r"\boxed{4 4/9}", r"\frac{40}{9}", True),
    Case("mixed_number", r"The answer is $2 \frac{1}{3}$.", "7/3", True),
    Case("mixed_number", r"\boxed{-1 1/2}", "-1.5", True),
    Case("mixed_number", r"\boxed{4 4/9}", "44/9", False, hard=True),
    Case("mixed_number", r"\boxed{1 1/2}", "11/2", False, hard=True),
    Case("mixed_number", r"\boxed{3 1/4}", "31/4", False, hard=True),
    # a space between two numbers is a product (or a list), not one longer number
    Case("juxtaposed", r"\boxed{2^6 3}", "2^{63}", False, hard=True),
    Case("juxtaposed", r"\boxed{2^3 3^2}", "72", True, note="2^3 3^2 = 8 * 9"),
    Case("juxtaposed", r"\boxed{2^6 3^5 5^4}", r"2^6 \cdot 3^5 \cdot 5^4", True),
    Case("juxtaposed", r"\boxed{3 5}", "35", False, hard=True),
    Case("juxtaposed", r"\boxed{10 10}", "1010", False, hard=True),
    Case("thousands", r"\boxed{1 000 000}", "1000000", True, note="SI-style thousands spaces"),
    Case("thousands", r"\boxed{12 500}", "12500", True),
    # a leading 0 group is not a thousands group: 0,125 is no 125
    Case("thousands", r"\boxed{125}", "0,125", False, hard=True),
    Case("thousands", r"\boxed{40}", "0,040", False, hard=True),
    Case("thousands", r"\boxed{7 300}", "7300", True),
    # ASCII relations are the LaTeX ones
    Case("inequality", r"\boxed{x >= 3}", r"[3,\infty)", True),
    Case("inequality", r"The answer is $y <= -2$.", r"y \le -2", True),
    Case("inequality", r"\boxed{x \geq 4}", "x >= 4", True),
    Case("inequality", r"\boxed{x >= 3}", r"(3,\infty)", False, hard=True),
    Case("inequality", r"\boxed{x <= 3}", "x >= 3", False, hard=True),
    # a negated variable: both sides times -1
    Case("inequality", r"\boxed{-x > -2}", "x < 2", True),
    Case("inequality", r"\boxed{-t \le 5}", r"t \geq -5", True),
    Case("inequality", r"\boxed{-x > 2}", "x > -2", False, hard=True),
]

# ---------------------------------------------------------------- a "Final Answer:" line written as a sentence
CASES += [
    Case("final_sentence", "So the area is 6 * 7 = 42.\nFinal Answer: The area of the garden is 42.", "42", True),
    Case("final_sentence", "Thus h = 4 and V = 80. Final Answer: The volume of the box is $80$.", "80", True),
    Case("final_sentence", "Final Answer: Tom has 7 apples left.", "7", True),
    Case("final_sentence", "Final Answer: The two roots are $2$ and $5$.", "2,5", True),
    Case("final_sentence", "Final Answer: The largest $k$ is 12.", "21", False, hard=True),
    Case("final_sentence", "Final Answer: The speed was 60 km/h, so the trip took 3 hours.", "60", False,
         note="what follows 'was' is a clause, not a value: no answer is read, so no match"),
    Case("final_sentence", "Final Answer: I could not finish the computation.", "3", False, hard=True),
]
