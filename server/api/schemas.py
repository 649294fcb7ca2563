"""Request and response bodies of the HTTP API (pydantic)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class GenerateParameters(BaseModel):
    """Decoding parameters. With none given, decoding is greedy with ``max_new_tokens`` from the server settings
    (64 by default)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, strict=True, description="Tokens to generate at most (>= 1).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Per-request sampling seed.")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=8, description="Up to 8 stop strings; the text is cut before the first one."
    )
    timeout: float | None = Field(
        None, gt=0, description="Deadline in seconds from arrival (at most the server's --request-timeout); past it "
        "the request ends with finish_reason 'timeout' and the text generated so far."
    )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(..., description="Text the task's virtual tokens are prepended to. May be empty "
                        "when the task has a prompt-tuning or p-tuning prompt (not a prefix-tuning one).")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="Return Server-Sent Events, one per text delta.")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Text tokens of the input; virtual tokens are not counted here.")
    virtual_tokens: int = Field(..., description="The soft prompt's virtual tokens.")
    completion_tokens: int = Field(..., description="Generated tokens (an EOS token included).")


class GenerateResponse(BaseModel):
    generated_text: str
    finish_reason: str = Field(description="stop (EOS or a stop string), length (max_new_tokens), timeout (the "
                               "request's deadline passed) or shutdown (the server's drain timeout ran out).")
    task: str | None
    prompt_version: int | None
    usage: Usage


class TaskInfo(BaseModel):
    task: str
    num_virtual_tokens: int
    version: int
    peft_type: str = Field(description="PROMPT_TUNING, P_TUNING, PREFIX_TUNING or RAW (input embeddings).")
    nbytes: int = Field(description="Bytes of the prompt tensor as stored.")


class TaskList(BaseModel):
    tasks: list[TaskInfo]
